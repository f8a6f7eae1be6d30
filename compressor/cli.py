"""The `moe-compress` command line."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
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
    from compressor.families import open_checkpoint
    from compressor.families.base import format_ranges
    from compressor.io.resolve import resolve_model

    directory, _ = resolve_model(model, revision)
    checkpoint = open_checkpoint(directory)
    config, family, reader, layout = checkpoint.config, checkpoint.family, checkpoint.reader, checkpoint.layout
    moe_layers = family.moe_layers(config)
    counts = sorted({family.num_experts(config, layer) for layer in moe_layers})
    router = family.router(config)
    shared = "with shared experts" if any(layout.layers[layer].shared for layer in moe_layers) else "no shared experts"
    stored = "per expert" if all(t.per_expert for layer in layout.layers.values() for t in layer.experts) else "fused"
    click.echo(f"model:       {directory}")
    click.echo(f"family:      {family.name} (model_type {config.get('model_type')})")
    click.echo(f"layers:      {family.num_layers(config)}, MoE layers {format_ranges(moe_layers)} ({len(moe_layers)})")
    click.echo(f"experts:     {'/'.join(map(str, counts))} routed per MoE layer, {shared}; stored {stored} on disk")
    groups = f" in the best {router.topk_group} of {router.n_group} expert groups" if router.grouped else ""
    extras = [f"x{router.routed_scaling_factor:g}"] if router.routed_scaling_factor != 1 else []
    extras += ["selection bias"] if router.correction_bias else []
    click.echo(f"routing:     {router.scoring}, top-{router.top_k}{groups}, {router.topk_method}, "
               f"renormalise {'yes' if router.renormalize else 'no'}{''.join(', ' + e for e in extras)}")
    click.echo(f"tensors:     {len(reader.names())} in {len(reader.shards())} shard(s), "
               f"{reader.total_bytes / 2**30:.2f} GiB")
    checkpoint.close()


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="directory to write into")
@click.option("--overwrite", is_flag=True, help="replace an existing report directory")
def report(files, output, overwrite):
    """One HTML page (+ PNGs and summary.md) from PROFILE.json, PLAN.json, validation.json and/or LENS.json."""
    from compressor.report import write_report

    for page in write_report(list(files), output, overwrite):
        click.echo(f"wrote {page}")


@cli.command()
@click.argument("recipe_path", metavar="RECIPE.yaml", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a recipe key, e.g. --set work_dir=/tmp/run --set export.compensation=scale")
def run(recipe_path, overrides):
    """Run a recipe: profile (+ lens) -> plan -> export (+ validation) -> push, skipping up-to-date stages."""
    from compressor.recipe import load_recipe, run_recipe
    from compressor.report import write_report

    recipe = load_recipe(recipe_path, overrides)
    outcome = run_recipe(recipe, echo=click.echo)
    artifacts = outcome["artifacts"]
    files = [artifacts[name] for name in ("profile", "lens", "plan", "validation") if artifacts[name]]
    page, *_ = write_report(files, Path(recipe.work_dir) / "report", overwrite=True)
    click.echo(f"report: {page}")
    if artifacts["validation"]:
        from compressor.validation.cli import summary_table
        from compressor.validation.schema import ValidationReport

        click.echo(summary_table(ValidationReport.load(artifacts["validation"])))
    if outcome["passed"] is False:
        click.echo("validation FAILED: see the report", err=True)
        sys.exit(1)


_LAZY_COMMANDS = {
    # name: (module:attribute, one-line help) — modules load only when their command runs (`--help` stays fast)
    "data": ("compressor.data.cli:data", "The demo domains: fetch their sources, list them."),
    "export": ("compressor.export.cli:export", "Write MODEL pruned by PLAN.json into OUT, shard by shard."),
    "lens": ("compressor.lens.cli:lens", "Early decoding: how close the top-1 expert comes to the top-k ensemble."),
    "plan": ("compressor.planning.cli:plan", "Choose the experts to keep from a profile; `plan show` summarises."),
    "profile": ("compressor.profiling.cli:profile", "Record per-domain routing statistics of a model."),
    "quantize": ("compressor.quantize.cli:quantize", "Quantize an exported OUT into compressed-tensors (vLLM) format."),
    "push": ("compressor.hub.cli:push", "Upload an exported OUT to the Hugging Face Hub."),
    "serve-check": ("compressor.serving.cli:serve_check", "Check that vLLM loads OUT and computes the same."),
    "validate": ("compressor.validation.cli:validate", "Compare a compressed model with its original."),
}


class _LazyGroup(click.Group):
    """A command group whose subcommands are imported on first use."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(_LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in self.commands or name not in _LAZY_COMMANDS:
            return super().get_command(ctx, name)
        module, _, attribute = _LAZY_COMMANDS[name][0].partition(":")
        command = getattr(importlib.import_module(module), attribute)
        self.add_command(command, name)
        return command

    def format_commands(self, ctx, formatter):
        rows = [(name, _LAZY_COMMANDS[name][1] if name in _LAZY_COMMANDS and name not in self.commands
                 else self.commands[name].get_short_help_str(limit=formatter.width)) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


cli.__class__ = _LazyGroup


class Terminated(BaseException):
    """SIGTERM: unwinds like Ctrl-C, so staging and scratch files are removed before the process ends."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _exit_now(message: str, code: int) -> None:
    """Exit at once after an interrupt (every cleanup has run by now). CPython would turn the exit code into a
    death by SIGINT when the KeyboardInterrupt passed through certain C-level calls, so skip its finalisation."""
    click.echo(message, err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI; bad input becomes one `error: ...` line on stderr and exit code 2."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        cli.main(args=argv, standalone_mode=False, prog_name="moe-compress")
    except UserError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(UserError.exit_code)
    except click.exceptions.NoArgsIsHelpError as error:  # a bare group: its help, as with --help
        click.echo(error.ctx.get_help() if error.ctx is not None else error.format_message())
        sys.exit(0)
    except click.exceptions.UsageError as error:
        hint = f" (see moe-compress {error.ctx.command_path.partition(' ')[2]} --help)".replace("  ", " ") \
            if error.ctx is not None else ""
        click.echo(f"error: {_one_line(error.format_message())}{hint}", err=True)
        sys.exit(UserError.exit_code)
    except click.ClickException as error:
        click.echo(f"error: {_one_line(error.format_message())}", err=True)
        sys.exit(UserError.exit_code)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _exit_now("error: interrupted; nothing was left half-written", 130)
    except Terminated:
        _exit_now("error: terminated (SIGTERM); nothing was left half-written", 143)
    except Exception as error:  # noqa: BLE001 - the promise is one line and exit 2, whatever went wrong
        if os.environ.get("MOE_COMPRESS_DEBUG"):
            raise
        message = _one_line(error) or "no message"
        click.echo(f"error: {type(error).__name__}: {message} (set MOE_COMPRESS_DEBUG=1 for the traceback)",
                   err=True)
        sys.exit(UserError.exit_code)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
