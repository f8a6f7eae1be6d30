"""Small helpers shared by the stage commands."""

from __future__ import annotations

import functools
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


def forward_options(layerwise_help: str = "hold one decoder layer in memory at a time (models larger than RAM)"):
    """--seq-len, --batch-size, --dtype, --device, --layerwise and --text-field, handed to the command as one
    `forward` argument (`runtime.ForwardOptions`)."""
    options = [
        click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
        click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16"),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto"),
        click.option("--layerwise", is_flag=True, help=layerwise_help),
        click.option("--text-field", default="text", show_default=True, help="text field of .jsonl/.parquet/hf: rows"),
    ]

    def decorate(command):
        @functools.wraps(command)
        def with_forward(*args, seq_len, batch_size, dtype, device, layerwise, text_field, **kwargs):
            from compressor.runtime import ForwardOptions

            return command(*args, forward=ForwardOptions(seq_len, batch_size, dtype, device, layerwise, text_field),
                           **kwargs)

        for option in reversed(options):
            with_forward = option(with_forward)
        return with_forward

    return decorate
