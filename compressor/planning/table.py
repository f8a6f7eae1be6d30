"""Human-readable summary of a plan: per-layer kept counts and routing coverage retained per domain."""

from __future__ import annotations

from compressor.errors import UserError
from compressor.planning.plan import Plan, non_uniform_note
from compressor.profiling.schema import Profile


def format_plan_table(plan: Plan, profile: Profile | None = None) -> str:
    """Per-layer table (layer, kept / total, % of each domain's routing decisions retained), then a line saying
    whether the plan is uniform. Coverage comes from `profile` when given, else from the plan's prediction."""
    from compressor.planning.strategies import predicted_coverage

    kept = plan.kept()
    if profile is not None:
        if profile.model.family != plan.model.family or profile.model.config_hash != plan.model.config_hash:
            raise UserError(
                f"the profile is of another model ({profile.model.source}) than the plan ({plan.model.source})"
            )
        coverage = predicted_coverage(profile, kept)
    else:
        coverage = plan.predicted_coverage or {}
    domains = list(coverage)

    header = ["layer", "kept / total", *domains]
    rows = []
    for layer, experts in kept.items():
        total = plan.model.experts_per_layer.get(str(layer))
        row = [str(layer), f"{len(experts)} / {total if total is not None else '?'}"]
        for domain in domains:
            share = coverage[domain].get(str(layer))
            row.append("-" if share is None else f"{100 * share:.1f}%")
        rows.append(row)
    kept_total = sum(len(experts) for experts in kept.values())
    all_total = sum(int(plan.model.experts_per_layer.get(str(layer), 0)) for layer in kept)
    summary = ["all", f"{kept_total} / {all_total}"]
    for domain in domains:
        shares = list(coverage[domain].values())
        summary.append(f"{100 * sum(shares) / len(shares):.1f}%" if shares else "-")
    rows.append(summary)

    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = []
    strategy = plan.strategy.name if plan.strategy else "hand-written"
    criterion = plan.strategy.parameters.get("criterion") if plan.strategy else None
    lines.append(
        f"plan for {plan.model.source} ({plan.model.family}): {strategy}"
        f"{f' by {criterion}' if criterion else ''}, top-{plan.top_k} routing"
        f"{' without expert groups' if plan.ungroup and plan.model.expert_groups else ''}, "
        f"compensation {plan.compensation}"
    )
    if domains:
        lines.append("(domain columns: % of that domain's routing decisions that land on kept experts; "
                     "row 'all': mean over layers)")
    lines.append("  ".join(cell.rjust(width) for cell, width in zip(header, widths)))
    for row in rows:
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    if not domains:
        lines.append("no predicted coverage (hand-written plan): pass --profile PROFILE.json to compute it")
    if plan.is_uniform():
        count = len(next(iter(kept.values()))) if kept else 0
        lines.append(f"uniform plan: {count} experts kept in every MoE layer")
    else:
        lines.append(non_uniform_note(plan.model.family))
    return "\n".join(lines)
