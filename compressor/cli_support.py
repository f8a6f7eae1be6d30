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


def _grouped(options: list, build):
    """A decorator adding click `options` whose values reach the command as the one argument `build` returns:
    build(kwargs) pops its options' values from the command's kwargs and returns (argument name, value)."""

    def decorate(command):
        @functools.wraps(command)
        def with_group(*args, **kwargs):
            name, value = build(kwargs)
            return command(*args, **{name: value}, **kwargs)

        for option in reversed(options):
            with_group = option(with_group)
        return with_group

    return decorate


def run_options(purpose: str):
    """--seq-len, --batch-size, --device and --dtype of the models an output command runs (`purpose`: what for),
    handed to the command as `run` (`export.exporter.RunOptions`)."""

    def build(kwargs):
        from compressor.export.exporter import RunOptions

        return "run", RunOptions(**{k: kwargs.pop(k) for k in ("seq_len", "batch_size", "device", "dtype")})

    return _grouped(_compute_options(f"cpu, cuda, cuda:N or auto ({purpose})", f"compute dtype ({purpose})"), build)


def _compute_options(device_help: str, dtype_help: str) -> list:
    """--seq-len, --batch-size, --device and --dtype: how models run over text (RunOptions, ForwardOptions)."""
    return [
        click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
        click.option("--device", default="auto", show_default=True, help=device_help),
        click.option("--dtype", default="float32", show_default=True, help=dtype_help),
    ]


def output_validation_options(compared: str):
    """The validation an output command runs at its end and its gates (`compared`: which two models), handed to the
    command as `validation` (`export.exporter.ExportValidation`; its max_tokens is the command's to set)."""

    def build(kwargs):
        from compressor.data.sources import parse_named_sources
        from compressor.evaluation.harness import parse_task_gate, parse_task_names
        from compressor.export.exporter import ExportValidation
        from compressor.validation.runner import parse_ppl_gate

        data = kwargs.pop("validate_on")
        return "validation", ExportValidation(
            enabled=not kwargs.pop("no_validate"), data=parse_named_sources(data) if data else {},
            max_ppl_increase=parse_ppl_gate(kwargs.pop("max_ppl_increase")), min_cosine=kwargs.pop("min_cosine"),
            tasks=tuple(parse_task_names(kwargs.pop("validate_tasks"))), task_limit=kwargs.pop("task_limit"),
            tasks_include=tuple(map(str, kwargs.pop("tasks_include"))),
            max_task_drop=parse_task_gate(kwargs.pop("max_task_drop")))

    return _grouped([
        click.option("--no-validate", is_flag=True, help=f"skip the validation at the end ({compared})"),
        click.option("--validate-on", multiple=True, metavar="NAME=SOURCE",
                     help="held-out data for the validation (default: the evaluation split of demo calibration "
                          "domains)"),
        click.option("--max-ppl-increase", default=None, metavar="X|NAME=X,...",
                     help="validation gate: 0.05 for every domain, or code=0.05,english=0.5"),
        click.option("--min-cosine", type=float, default=None, help="validation gate on hidden-state cosine"),
        click.option("--validate-tasks", multiple=True, metavar="TASK[,TASK...]",
                     help="lm-evaluation-harness tasks the validation scores on both models (see validate --tasks)"),
        click.option("--task-limit", type=click.IntRange(min=1), default=None, help="documents per task (the first N)"),
        click.option("--tasks-include", multiple=True, type=click.Path(path_type=Path), metavar="DIR",
                     help="a folder of harness task YAML files to find tasks in"),
        click.option("--max-task-drop", default=None, metavar="X|TASK=X,...",
                     help="validation gate: a task's score may drop at most this much (absolute), e.g. "
                          "demo_math_answer=0.02"),
    ], build)


def forward_options(layerwise_help: str = "hold one decoder layer in memory at a time (models larger than RAM)"):
    """--seq-len, --batch-size, --device, --dtype, --layerwise and --text-field, handed to the command as one
    `forward` argument (`runtime.ForwardOptions`)."""

    def build(kwargs):
        from compressor.runtime import ForwardOptions

        return "forward", ForwardOptions(**{k: kwargs.pop(k) for k in ("seq_len", "batch_size", "dtype", "device",
                                                                       "layerwise", "text_field")})

    return _grouped([
        *_compute_options("cpu, cuda, cuda:N or auto", "float32, bfloat16 or float16"),
        click.option("--layerwise", is_flag=True, help=layerwise_help),
        click.option("--text-field", default="text", show_default=True, help="text field of .jsonl/.parquet/hf: rows"),
    ], build)
