"""`moe-compress export MODEL PLAN.json -o OUT`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from compressor.cli_support import output_validation_options, run_options
from compressor.data.sources import SOURCE_FORMS, parse_named_sources
from compressor.export.exporter import (
    COMPENSATIONS, DistillOptions, ExportOptions, FitOptions, export_checkpoint, parse_size,
)


@click.command()
@click.argument("model")
@click.argument("plan_path", metavar="PLAN.json", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="output checkpoint directory")
@click.option("--compensation", type=click.Choice(COMPENSATIONS), default=None,
              help="how to make up for narrower routing (default: the plan's)")
@click.option("--calibration", multiple=True, metavar="NAME=SOURCE",
              help=f"calibration data for scale/refit/distill; SOURCE: {SOURCE_FORMS}")
@click.option("--max-shard-size", default="5GB", show_default=True, help="largest output shard, e.g. 2GB")
@click.option("--max-tokens", type=click.IntRange(min=1), default=32768, show_default=True,
              help="calibration tokens in all")
@click.option("--distill-steps", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--distill-router", is_flag=True, help="distill also trains the kept experts' router rows")
@click.option("--distill-e2e-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="then this many end-to-end steps on the original's next-token distribution (whole model in memory)")
@click.option("--distill-e2e-lr", type=click.FloatRange(min=0, min_open=True), default=4e-4, show_default=True)
@run_options("fitting and validation")
@click.option("--revision", default=None, help="Hub revision of MODEL")
@click.option("--overwrite", is_flag=True, help="replace an existing OUT")
@output_validation_options("original vs OUT")
@click.option("--push-to-hub", metavar="REPO_ID", default=None,
              help="then upload OUT to this Hub model repo unless validation failed (token: HF_TOKEN or hf auth login)")
def export(model, plan_path, output, compensation, calibration, max_shard_size, max_tokens, distill_steps,
           distill_router, distill_e2e_steps, distill_e2e_lr, run, revision, overwrite, validation, push_to_hub):
    """Write MODEL pruned by PLAN.json into OUT, shard by shard, without loading the model."""
    from compressor.planning import Plan

    if push_to_hub:  # a bad repo id or a missing token fails before the export, not after it
        from compressor.hub import check_push_ready

        check_push_ready(push_to_hub)
    plan = Plan.load(plan_path)
    options = ExportOptions(
        compensation=compensation, max_shard_bytes=parse_size(max_shard_size), overwrite=overwrite, revision=revision,
        run=run,
        fit=FitOptions(calibration=parse_named_sources(calibration) if calibration else {}, max_tokens=max_tokens,
                       distill=DistillOptions(steps=distill_steps, router=distill_router, e2e_steps=distill_e2e_steps,
                                              e2e_lr=distill_e2e_lr)),
        validation=validation,
    )
    result = export_checkpoint(model, plan, output, options)
    click.echo(f"wrote {result.output}: {result.tensors} tensors, {result.bytes / 2**30:.2f} GiB, "
               f"compensation {result.compensation}")
    if result.validation is not None:
        from compressor.validation.cli import echo_output_validation

        echo_output_validation(result.validation)
    if not plan.is_uniform():
        from compressor.planning import non_uniform_note

        click.echo(f"note: {non_uniform_note(plan.model.family)}")
    failed = result.validation is not None and not result.validation.passed
    if push_to_hub and failed:
        click.echo(f"not pushing to {push_to_hub}: validation failed (`moe-compress push --force` would)", err=True)
    elif push_to_hub:
        from compressor.hub import push_output

        click.echo(f"pushed to {push_to_hub}: {push_output(result.output, push_to_hub)}")
    if failed:
        sys.exit(1)
