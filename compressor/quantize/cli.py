"""`moe-compress quantize OUT -o OUT_Q --scheme fp8-dynamic|w8a16|w4a16`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from compressor.data.sources import SOURCE_FORMS, parse_named_sources
from compressor.quantize.quantizer import SCHEMES


@click.command()
@click.argument("source", metavar="OUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="quantized output directory")
@click.option("--scheme", required=True, help=f"one of {', '.join(SCHEMES)}")
@click.option("--group-size", type=click.IntRange(min=0), default=128, show_default=True,
              help="w8a16/w4a16: input columns sharing one scale; 0: one scale per output channel")
@click.option("--max-shard-size", default="5GB", show_default=True, help="largest output shard, e.g. 2GB")
@click.option("--overwrite", is_flag=True, help="replace an existing OUT_Q")
@click.option("--no-validate", is_flag=True, help="skip the validation (original vs quantized)")
@click.option("--validate-on", multiple=True, metavar="NAME=SOURCE",
              help=f"held-out data (default: the evaluation split of the export's demo calibration); {SOURCE_FORMS}")
@click.option("--max-tokens", type=click.IntRange(min=2), default=16384, show_default=True,
              help="validation tokens in all")
@click.option("--max-ppl-increase", default=None, metavar="X|NAME=X,...", help="validation gate, as for export")
@click.option("--min-cosine", type=float, default=None, help="validation gate on hidden-state cosine")
@click.option("--validate-tasks", multiple=True, metavar="TASK[,TASK...]",
              help="lm-evaluation-harness tasks the validation scores on both models (see validate --tasks)")
@click.option("--task-limit", type=click.IntRange(min=1), default=None, help="documents per task (the first N)")
@click.option("--tasks-include", multiple=True, type=click.Path(path_type=Path), metavar="DIR",
              help="a folder of harness task YAML files to find tasks in")
@click.option("--max-task-drop", default=None, metavar="X|TASK=X,...", help="validation gate, as for export")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", default="auto", show_default=True, help="validation device: cpu, cuda or auto")
@click.option("--dtype", default="float32", show_default=True, help="validation compute dtype")
def quantize(source, output, scheme, group_size, max_shard_size, overwrite, no_validate, validate_on, max_tokens,
             max_ppl_increase, min_cosine, validate_tasks, task_limit, tasks_include, max_task_drop, seq_len,
             batch_size, device, dtype):
    """Quantize an exported OUT (round-to-nearest) into compressed-tensors format, which vLLM serves."""
    from compressor.export.exporter import ExportValidation, RunOptions, parse_size
    from compressor.quantize.quantizer import QuantizeOptions, quantize_checkpoint
    from compressor.evaluation.harness import parse_task_gate, parse_task_names
    from compressor.validation.runner import parse_ppl_gate

    validation = ExportValidation(enabled=not no_validate, data=parse_named_sources(validate_on) if validate_on else {},
                                  max_tokens=max_tokens, max_ppl_increase=parse_ppl_gate(max_ppl_increase),
                                  min_cosine=min_cosine, tasks=tuple(parse_task_names(validate_tasks)),
                                  task_limit=task_limit, tasks_include=tuple(map(str, tasks_include)),
                                  max_task_drop=parse_task_gate(max_task_drop))
    options = QuantizeOptions(scheme=scheme, group_size=group_size, max_shard_bytes=parse_size(max_shard_size),
                              overwrite=overwrite, validation=validation,
                              run=RunOptions(device=device, dtype=dtype, seq_len=seq_len, batch_size=batch_size))
    result = quantize_checkpoint(source, output, options)
    click.echo(f"wrote {result.output}: {result.scheme}, {result.quantized} weights quantized, "
               f"{result.bytes / 2**20:.1f} MiB (was {result.source_bytes / 2**20:.1f} MiB)")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if result.validation is not None:
        from compressor.validation.cli import echo_output_validation

        if not echo_output_validation(result.validation):
            sys.exit(1)
