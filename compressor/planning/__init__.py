"""The plan stage: choose the routed experts to keep per MoE layer from a routing profile.

- `make_plan(profile, PlanOptions(...))` -> `Plan` (strategies uniform / coverage / global; criteria
  frequency / top1 / gate / reap; domain targeting and weights; protected experts).
- `Plan.load(path)` / `plan.save(path)`: the public, versioned plan file (hand-written plans are valid).
- `check_plan_matches(plan, config, family)`: the plan belongs to this model and meets the family's constraints.
- `format_plan_table(plan, profile=None)`: per-layer summary text.
"""

from compressor.planning.plan import (
    COMPENSATIONS,
    PLAN_FORMAT_VERSION,
    LayerPlan,
    Plan,
    StrategyRecord,
    check_plan_matches,
    non_uniform_note,
)
from compressor.planning.strategies import (
    CRITERIA,
    STRATEGIES,
    PlanOptions,
    expert_scores,
    make_plan,
    parse_domains,
    parse_protect,
    predicted_coverage,
)
from compressor.planning.table import format_plan_table

__all__ = [
    "COMPENSATIONS",
    "CRITERIA",
    "PLAN_FORMAT_VERSION",
    "STRATEGIES",
    "LayerPlan",
    "Plan",
    "PlanOptions",
    "StrategyRecord",
    "check_plan_matches",
    "expert_scores",
    "format_plan_table",
    "make_plan",
    "non_uniform_note",
    "parse_domains",
    "parse_protect",
    "predicted_coverage",
]
