"""Small helpers shared by the stage commands."""

from __future__ import annotations

from pathlib import Path

import click

from compressor.errors import UserError


class DefaultCommandGroup(click.Group):
    """A group whose default subcommand runs when the first argument names no subcommand
    (`profile MODEL ...` runs `profile run MODEL ...`, while `profile merge ...` runs `merge`)."""

    def __init__(self, *args, default_command: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.default_command = default_command

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def checked_output_path(path: Path, overwrite: bool) -> None:
    """Fail before any work when an output file exists (without --overwrite) or its folder cannot exist."""
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it")
    if path.exists() and path.is_dir():
        raise UserError(f"{path} is a directory; give a file name")
