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
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="directory to write into")
def report(files, output):
    """Figures and a summary of a PROFILE.json (routing heatmaps, top-expert share, coverage)."""
    from compressor.profiling.report import write_profile_report
    from compressor.profiling.schema import Profile

    if output.exists() and not output.is_dir():
        raise UserError(f"{output} exists and is not a directory")
    for path in files:
        summary = write_profile_report(Profile.load(path), output)
        click.echo(f"wrote {summary} and figures in {output}")


def _register_commands() -> None:
    from compressor.data.cli import data
    from compressor.profiling.cli import profile

    cli.add_command(data)
    cli.add_command(profile)


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
