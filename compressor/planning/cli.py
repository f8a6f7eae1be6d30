"""`moe-compress plan PROFILE.json -o PLAN.json ...` and `moe-compress plan show PLAN.json`."""

from __future__ import annotations

from pathlib import Path

import click

from compressor.cli_support import DefaultCommandGroup, checked_output_path
from compressor.planning.plan import COMPENSATIONS, Plan
from compressor.planning.strategies import (
    CRITERIA,
    STRATEGIES,
    PlanOptions,
    make_plan,
    parse_domains,
    parse_protect,
)
from compressor.planning.table import format_plan_table
from compressor.profiling.schema import Profile


@click.group(cls=DefaultCommandGroup, default_command="make")
def plan() -> None:
    """Choose the experts to keep (`plan PROFILE.json -o PLAN.json`); `plan show PLAN.json` summarises a plan."""


@plan.command("make")
@click.argument("profile_path", metavar="PROFILE.json", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="plan JSON to write")
@click.option("--strategy", default="uniform", show_default=True, metavar="|".join(STRATEGIES),
              help="uniform: same count per layer (loads everywhere); coverage: per layer, fewest experts covering "
                   "--coverage of routing mass; global: --keep-fraction of all experts, spread over layers by score")
@click.option("--keep", type=int, default=None, help="uniform: experts kept in every layer")
@click.option("--keep-fraction", type=float, default=None,
              help="uniform: share of each layer's experts; global: share of all routed experts [default: 0.5]")
@click.option("--coverage", type=float, default=None, help="coverage: share of routing mass to keep, in (0, 1] "
                                                            "[default: 0.9]")
@click.option("--min-keep", type=int, default=None, help="coverage/global: fewest experts per layer [default: top-k]")
@click.option("--max-keep", type=int, default=None, help="coverage/global: most experts per layer")
@click.option("--criterion", default="frequency", show_default=True, metavar="|".join(CRITERIA),
              help="expert score: frequency (selections), top1 (top-1 selections), gate (router weight mass), "
                   "reap (mean router-weighted activation)")
@click.option("--domains", default=None, metavar="NAME[:WEIGHT],...",
              help="domains to target, optionally weighted (code:2,math:1) [default: all, weight 1]")
@click.option("--protect", multiple=True, metavar="LAYER:EXPERT,...", help="experts always kept")
@click.option("--top-k", type=int, default=1, show_default=True, help="experts per token in the output")
@click.option("--compensation", default="distill", show_default=True, metavar="|".join(COMPENSATIONS),
              help="recorded in the plan; export may override it")
@click.option("--keep-groups", type=int, default=None,
              help="uniform, group-limited routers: expert groups kept per layer, those of highest total score "
                   "(the output routes over that many) [default: all]")
@click.option("--ungroup", is_flag=True,
              help="group-limited routers: the output routes by plain top-k (one expert group), so any strategy may "
                   "keep unequal numbers per expert group [default: keep every group's count equal]")
@click.option("--overwrite", is_flag=True, help="replace an existing output file")
def make(profile_path, output, strategy, keep, keep_fraction, coverage, min_keep, max_keep, criterion, domains,
         protect, top_k, compensation, keep_groups, ungroup, overwrite):
    """Make a plan from PROFILE.json (written by `moe-compress profile`)."""
    checked_output_path(output, overwrite)
    options = PlanOptions(
        strategy=strategy, keep=keep, keep_fraction=keep_fraction, coverage=coverage, min_keep=min_keep,
        max_keep=max_keep, criterion=criterion, domains=parse_domains(domains),
        protect=parse_protect(",".join(protect)), top_k=top_k, compensation=compensation, ungroup=ungroup,
        keep_groups=keep_groups,
    )
    profile = Profile.load(profile_path)
    result = make_plan(profile, options)
    result.save(output, overwrite)
    click.echo(f"wrote {output}")
    click.echo(format_plan_table(result))


@plan.command("show")
@click.argument("plan_path", metavar="PLAN.json", type=click.Path(path_type=Path))
@click.option("--profile", "profile_path", type=click.Path(path_type=Path), default=None,
              help="compute routing coverage from this profile (default: the plan's own prediction)")
def show(plan_path, profile_path):
    """Per-layer summary of PLAN.json: experts kept and routing coverage retained per domain."""
    loaded = Plan.load(plan_path)
    profile = Profile.load(profile_path) if profile_path is not None else None
    click.echo(format_plan_table(loaded, profile))
