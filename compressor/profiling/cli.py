"""`moe-compress profile ...` and `moe-compress profile merge ...`."""

from __future__ import annotations

from pathlib import Path

import click

from compressor.cli_support import DefaultCommandGroup, checked_output_path, forward_options
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
@forward_options()
@click.option("--revision", default=None, help="Hub revision of MODEL")
@click.option("--overwrite", is_flag=True, help="replace an existing output file")
def run(model, data, output, max_tokens, forward, revision, overwrite):
    """Profile MODEL (a local directory or Hub id) on each NAME=SOURCE."""
    checked_output_path(output, overwrite, reads=[model])
    sources = parse_named_sources(data)
    options = ProfileOptions(max_tokens=max_tokens, forward=forward, revision=revision)
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
