"""The `moe-compress` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from compressor import __version__
from compressor.errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moe-compress")
def cli() -> None:
    """Make Mixture-of-Experts models smaller: profile, plan, export, validate, push."""


@cli.command()
@click.argument("model")
@click.option("--revision", default=None, help="Hub revision of MODEL")
def inspect(model, revision):
    """Show MODEL's family, MoE layers, experts, routing rule and size (reads headers only)."""
    from compressor.families import detect_family
    from compressor.io import CheckpointReader
    from compressor.io.resolve import resolve_model

    directory, _ = resolve_model(model, revision)
    with CheckpointReader(directory) as reader:
        config = reader.config
        family = detect_family(config)
        family.validate_checkpoint(config, reader.names())
        moe_layers = family.moe_layers(config)
        counts = sorted({family.num_experts(config, layer) for layer in moe_layers})
        router = family.router(config)
        click.echo(f"model:       {directory}")
        click.echo(f"family:      {family.name} (model_type {config.get('model_type')})")
        click.echo(f"layers:      {family.num_layers(config)}, MoE layers {moe_layers[0]}..{moe_layers[-1]} ({len(moe_layers)})"
                   if moe_layers else f"layers:      {family.num_layers(config)}, no MoE layers")
        click.echo(f"experts:     {'/'.join(map(str, counts))} routed per MoE layer, "
                   f"{family.num_shared_experts(config)} shared")
        click.echo(f"routing:     {router.scoring}, top-{router.top_k}, {router.topk_method}, "
                   f"renormalise {'yes' if router.renormalize else 'no'}")
        click.echo(f"tensors:     {len(reader.names())} in {len(reader.shards())} shard(s), "
                   f"{reader.total_bytes / 2**30:.2f} GiB")


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="directory to write into")
@click.option("--overwrite", is_flag=True, help="replace an earlier report in that directory")
def report(files, output, overwrite):
    """One HTML page (+ PNGs) from PROFILE.json, PLAN.json and/or validation.json; a summary.md per profile."""
    from compressor.profiling.report import write_profile_report
    from compressor.profiling.schema import Profile
    from compressor.report import load_artifact, write_html_report

    if output.exists() and not output.is_dir():
        raise UserError(f"{output} exists and is not a directory")
    if (output / "report.html").exists() and not overwrite:
        raise UserError(f"{output} already holds a report; pass --overwrite to replace it")
    for path in files:
        if isinstance(load_artifact(path), Profile):
            click.echo(f"wrote {write_profile_report(Profile.load(path), output)}")
    click.echo(f"wrote {write_html_report(list(files), output)}")


@cli.command()
@click.argument("recipe_path", metavar="RECIPE.yaml", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a recipe key, e.g. --set work_dir=/tmp/run --set export.compensation=scale")
def run(recipe_path, overrides):
    """Run a recipe: profile -> plan -> export (+ validation) -> push, skipping up-to-date stages."""
    from compressor.recipe import load_recipe, run_recipe
    from compressor.report import write_html_report

    recipe = load_recipe(recipe_path, overrides)
    outcome = run_recipe(recipe, echo=click.echo)
    artifacts = outcome["artifacts"]
    files = [artifacts["profile"], artifacts["plan"]] + ([artifacts["validation"]] if artifacts["validation"] else [])
    page = write_html_report(files, Path(recipe.work_dir) / "report")
    click.echo(f"report: {page}")
    if artifacts["validation"]:
        from compressor.validation.cli import summary_table
        from compressor.validation.schema import ValidationReport

        click.echo(summary_table(ValidationReport.load(artifacts["validation"])))
    if outcome["passed"] is False:
        click.echo("validation FAILED: see the report", err=True)
        sys.exit(1)


def _register_commands() -> None:
    from compressor.data.cli import data
    from compressor.export.cli import export
    from compressor.hub.cli import push
    from compressor.planning.cli import plan
    from compressor.profiling.cli import profile
    from compressor.serving.cli import serve_check
    from compressor.validation.cli import validate

    cli.add_command(data)
    cli.add_command(export)
    cli.add_command(push)
    cli.add_command(plan)
    cli.add_command(profile)
    cli.add_command(serve_check)
    cli.add_command(validate)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI, turning bad input into one line on stderr and exit code 2."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except UserError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(UserError.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
