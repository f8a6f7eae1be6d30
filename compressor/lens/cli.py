"""`moe-compress lens MODEL -d NAME=SOURCE ... -o LENS.json`."""

from __future__ import annotations

import os
from pathlib import Path

import click

from compressor.cli_support import checked_output_path, forward_options
from compressor.data.sources import SOURCE_FORMS, parse_named_sources


@click.command()
@click.argument("model")
@click.option("-d", "--data", "data", multiple=True, required=True, metavar="NAME=SOURCE",
              help=f"a domain; SOURCE: {SOURCE_FORMS} (demo: defaults to the evaluation split)")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="lens JSON to write")
@click.option("--max-tokens", type=click.IntRange(min=2), default=16384, show_default=True, help="tokens per domain")
@forward_options()
@click.option("--revision", default=None, help="Hub revision of MODEL")
@click.option("--overwrite", is_flag=True, help="replace an existing output file")
def lens(model, data, output, max_tokens, forward, revision, overwrite):
    """Early decoding of MODEL: how close the top-1 expert alone comes to the top-k ensemble, per MoE layer."""
    from compressor.lens import LensOptions, lens_model
    from compressor.lens.plots import lens_headline, write_lens_figures

    figures = output.parent / f"{output.stem}-plots"
    checked_output_path(output, overwrite, reads=[model])
    checked_output_path(figures, overwrite, directory=True, reads=[model])
    report = lens_model(model, parse_named_sources(data), LensOptions(
        max_tokens=max_tokens, forward=forward, revision=revision))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from compressor.io.atomic import atomic_directory

    with atomic_directory(figures, overwrite) as staging:
        write_lens_figures(report, staging)
    report.save(output, overwrite)
    for line in lens_headline(report):
        click.echo(line)
    click.echo(f"wrote {output} and {figures}")
