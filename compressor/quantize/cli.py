"""`moe-compress quantize OUT -o OUT_Q --scheme fp8-dynamic|w8a16|w4a16|mxfp4`."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from compressor.cli_support import output_validation_options, run_options
from compressor.quantize.quantizer import ALL_SCHEMES


@click.command()
@click.argument("source", metavar="OUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="quantized output directory")
@click.option("--scheme", required=True, help=f"one of {', '.join(ALL_SCHEMES)} (mxfp4: families whose experts are "
              "fused on disk, in their own MXFP4 format)")
@click.option("--group-size", type=click.IntRange(min=0), default=128, show_default=True,
              help="w8a16/w4a16: input columns sharing one scale; 0: one scale per output channel")
@click.option("--max-shard-size", default="5GB", show_default=True, help="largest output shard, e.g. 2GB")
@click.option("--overwrite", is_flag=True, help="replace an existing OUT_Q")
@output_validation_options("the original vs the quantized OUT_Q")
@click.option("--max-tokens", type=click.IntRange(min=2), default=16384, show_default=True,
              help="validation tokens in all")
@run_options("validation")
def quantize(source, output, scheme, group_size, max_shard_size, overwrite, validation, max_tokens, run):
    """Quantize an exported OUT (round-to-nearest) into compressed-tensors format, which vLLM serves, or (mxfp4) into
    the family's own MXFP4 format."""
    from compressor.export.exporter import parse_size
    from compressor.quantize.quantizer import QuantizeOptions, quantize_checkpoint

    options = QuantizeOptions(scheme=scheme, group_size=group_size, max_shard_bytes=parse_size(max_shard_size),
                              overwrite=overwrite, validation=dataclasses.replace(validation, max_tokens=max_tokens),
                              run=run)
    result = quantize_checkpoint(source, output, options)
    click.echo(f"wrote {result.output}: {result.scheme}, {result.quantized} weights quantized, "
               f"{result.bytes / 2**20:.1f} MiB (was {result.source_bytes / 2**20:.1f} MiB)")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if result.validation is not None:
        from compressor.validation.cli import echo_output_validation

        if not echo_output_validation(result.validation):
            sys.exit(1)
