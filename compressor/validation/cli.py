"""`moe-compress validate ORIGINAL COMPRESSED [-d NAME=SOURCE ...] [--tasks TASK,...] -o validation.json`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from compressor.cli_support import checked_output_path, forward_options
from compressor.data.sources import SOURCE_FORMS, parse_named_sources
from compressor.evaluation.harness import parse_task_gate, parse_task_names
from compressor.io.atomic import atomic_directory
from compressor.validation.plots import write_validation_plots
from compressor.validation.runner import ValidateOptions, parse_ppl_gate, validate_models


def echo_output_validation(report) -> bool:
    """Print the validation of a written output (export, quantize) and whether it failed; True when it passed."""
    click.echo(summary_table(report))
    if not report.passed:
        click.echo("validation FAILED (the output is written and its model card says so):\n  "
                   + "\n  ".join(report.failures), err=True)
    return report.passed


def summary_table(report) -> str:
    lines = []
    if report.domains:
        lines.append(f"{'domain':12} {'tokens':>8} {'ppl original':>13} {'ppl compressed':>15} {'change':>8} "
                     f"{'KL':>8} {'top-1 agree':>12}")
    for name, d in report.domains.items():
        lines.append(f"{name:12} {d.tokens:8d} {d.perplexity_original:13.3f} {d.perplexity_compressed:15.3f} "
                     f"{100 * d.perplexity_increase:+7.1f}% {d.kl_mean:8.4f} {100 * d.top1_agreement:11.1f}%")
    if report.layers:
        worst = min(report.layers.items(), key=lambda item: item[1].cosine_mean)
        lines.append(f"lowest hidden-state cosine: layer {worst[0]} (mean {worst[1].cosine_mean:.4f}, "
                     f"5th percentile {worst[1].cosine_p5:.4f})")
    if report.throughput is not None:
        t = report.throughput
        lines.append(f"forward tokens/s ({t.device}, {t.threads} threads): original {t.original_tokens_per_second:,.0f}, "
                     f"compressed {t.compressed_tokens_per_second:,.0f} "
                     f"({t.compressed_tokens_per_second / t.original_tokens_per_second:.2f}x)")
    if report.tasks:
        headers, rows = report.task_table()
        lines += [f"{a:24} {b:26} {c:>9} {d:>16} {e:>16} {f:>8}" for a, b, c, d, e, f in [headers, *rows]]
    return "\n".join(lines)


@click.command()
@click.argument("original")
@click.argument("compressed")
@click.option("-d", "--data", "data", multiple=True, metavar="NAME=SOURCE",
              help=f"held-out domain; SOURCE: {SOURCE_FORMS} (demo: defaults to the evaluation split); "
                   "optional with --tasks")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="validation JSON to write")
@click.option("--max-tokens", type=click.IntRange(min=2), default=16384, show_default=True, help="tokens per domain")
@click.option("--max-ppl-increase", default=None, metavar="X|NAME=X,...",
              help="fail when a domain's perplexity rises more: 0.05 for all, or code=0.05,english=0.5")
@click.option("--min-cosine", type=float, default=None, help="fail when a layer's mean hidden-state cosine is lower")
@click.option("--tasks", "tasks", multiple=True, metavar="TASK[,TASK...]",
              help="lm-evaluation-harness tasks scored on both models (shipped: demo_code_next_line, demo_math_answer)")
@click.option("--task-limit", type=click.IntRange(min=1), default=None, help="score only the first N documents per task")
@click.option("--tasks-include", multiple=True, type=click.Path(path_type=Path), metavar="DIR",
              help="a folder of harness task YAML files (local data only) to find tasks in")
@click.option("--max-task-drop", default=None, metavar="X|TASK=X,...",
              help="fail when a task scores lower by more (absolute): 0.02 for all, or demo_math_answer=0.02")
@forward_options(layerwise_help="run both models one decoder layer at a time, in lockstep")
@click.option("--overwrite", is_flag=True, help="replace an existing output file")
def validate(original, compressed, data, output, max_tokens, max_ppl_increase, min_cosine, tasks, task_limit,
             tasks_include, max_task_drop, forward, overwrite):
    """Compare COMPRESSED with ORIGINAL; exit 0 when every threshold holds, 1 otherwise."""
    plots_dir = output.parent / f"{output.stem}-plots"
    checked_output_path(output, overwrite, reads=[original, compressed])
    checked_output_path(plots_dir, overwrite, directory=True, reads=[original, compressed])
    options = ValidateOptions(max_tokens=max_tokens, forward=forward,
                              max_ppl_increase=parse_ppl_gate(max_ppl_increase), min_cosine=min_cosine,
                              tasks=tuple(parse_task_names(tasks)), task_limit=task_limit,
                              tasks_include=tuple(map(str, tasks_include)), max_task_drop=parse_task_gate(max_task_drop))
    report = validate_models(original, compressed, parse_named_sources(data) if data else {}, options)
    wrote = f"wrote {output}"
    if report.domains:  # the figures are of perplexity and cosine
        with atomic_directory(plots_dir, overwrite) as staging:
            plots = [plots_dir / p.name for p in write_validation_plots(report, staging)]
        wrote += f" and {', '.join(p.name for p in plots)} in {plots_dir}"
    report.save(output, overwrite)
    click.echo(summary_table(report))
    click.echo(wrote)
    if not report.passed:
        click.echo("validation FAILED:\n  " + "\n  ".join(report.failures), err=True)
        sys.exit(1)
    thresholds = max_ppl_increase is not None or min_cosine is not None or max_task_drop is not None
    click.echo("validation passed" if thresholds else
               "no thresholds given (--max-ppl-increase, --min-cosine, --max-task-drop)")
