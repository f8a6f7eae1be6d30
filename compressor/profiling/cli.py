"""`moe-compress profile ...` and `moe-compress profile merge ...`."""

from __future__ import annotations

from pathlib import Path

import click

from compressor.cli_support import DefaultCommandGroup, checked_output_path
from compressor.data.sources import SOURCE_FORMS, parse_named_sources
from compressor.profiling.merge import merge_profiles
from compressor.profiling.runner import ProfileOptions, profile_model
from compressor.profiling.schema import Profile


@click.group(cls=DefaultCommandGroup, default_command="run")
def profile() -> None:
    """Record per-domain routing statistics (`profile MODEL -d NAME=SOURCE ... -o PROFILE.json`)."""


@profile.command("run")
@click.argument("model")
@click.option("-d", "--data", "data", multiple=True, required=True, metavar="NAME=SOURCE",
              help=f"a calibration domain; SOURCE: {SOURCE_FORMS}")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="profile JSON to write")
@click.option("--max-tokens", type=click.IntRange(min=1), default=65536, show_default=True, help="tokens per domain")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto")
@click.option("--layerwise", is_flag=True, help="hold one decoder layer in memory at a time (models larger than RAM)")
@click.option("--text-field", default="text", show_default=True, help="text field of .jsonl/.parquet/hf: rows")
@click.option("--revision", default=None, help="Hub revision of MODEL")
@click.option("--overwrite", is_flag=True, help="replace an existing output file")
def run(model, data, output, max_tokens, seq_len, batch_size, dtype, device, layerwise, text_field, revision, overwrite):
    """Profile MODEL (a local directory or Hub id) on each NAME=SOURCE."""
    checked_output_path(output, overwrite, reads=[model])
    sources = parse_named_sources(data)
    options = ProfileOptions(max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, dtype=dtype,
                             device=device, layerwise=layerwise, text_field=text_field, revision=revision)
    result = profile_model(model, sources, options)
    if result.settings.world_size == 1 or _rank() == 0:
        result.save(output, overwrite)
        click.echo(f"wrote {output} ({', '.join(f'{n}: {d.tokens} tokens' for n, d in result.domains.items())})")


@profile.command("merge")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--overwrite", is_flag=True, help="replace an existing output file")
def merge(inputs, output, overwrite):
    """Merge profiles of the same model (different domains, or one domain measured in parts)."""
    checked_output_path(output, overwrite)
    merged = merge_profiles([Profile.load(path) for path in inputs])
    merged.save(output, overwrite)
    click.echo(f"wrote {output} (domains: {', '.join(merged.domains)})")


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))
