"""Small helpers shared by the stage commands."""

from __future__ import annotations

from pathlib import Path

import click


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


def checked_output_path(path: Path, overwrite: bool, *, directory: bool = False, reads=()) -> None:
    """Before any work: refuse an output that exists (without --overwrite), is of the other kind, cannot be
    written, or lies inside (or contains) a model directory in `reads` (local paths; Hub ids are skipped)."""
    from compressor.io.atomic import check_not_inside, check_writable_target

    check_writable_target(path, overwrite, directory=directory)
    check_not_inside(path, [Path(p) for p in reads if Path(p).is_dir()])
