"""Make a plan from a profile: score experts per layer (criterion, domain weights), then pick by strategy.

Scores are exact rationals (`fractions.Fraction`), so ties are real ties and always go to the lower expert id
(and, across layers in the `global` strategy, to the lower layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

from compressor.errors import UserError
from compressor.families.base import format_ranges
from compressor.planning.plan import COMPENSATIONS, LayerPlan, Plan, StrategyRecord
from compressor.profiling.schema import Profile

STRATEGIES = ("uniform", "coverage", "global")
CRITERIA = {"frequency": "selected", "top1": "top1", "gate": "gate_mass", "reap": "reap"}
DEFAULT_KEEP_FRACTION = 0.5
DEFAULT_COVERAGE = 0.9


@dataclass
class PlanOptions:
    """What `make_plan` should do. None means the strategy's default (see `resolved`)."""

    strategy: str = "uniform"
    keep: int | None = None  # uniform: experts kept in every layer
    keep_fraction: float | None = None  # uniform: of each layer's experts; global: of all routed experts
    coverage: float | None = None  # coverage: share of routing mass to keep per layer, in (0, 1]
    min_keep: int | None = None  # coverage/global: fewest experts per layer (default: top_k)
    max_keep: int | None = None  # coverage/global: most experts per layer (default: all)
    criterion: str = "frequency"
    domains: dict[str, float] | None = None  # name -> weight; None: every domain of the profile, weight 1
    protect: dict[int, set[int]] = field(default_factory=dict)  # layer -> expert ids always kept
    top_k: int = 1
    compensation: str = "distill"
    ungroup: bool = False  # rewrite a group-limited router to plain top-k (so groups need not stay balanced)
    keep_groups: int | None = None  # uniform on a group-limited router: expert groups kept per layer (default: all)


def parse_domains(text: str | None) -> dict[str, float] | None:
    """``"code,math"`` or ``"code:2,math:1"`` -> {name: weight}; None/empty -> None."""
    if text is None or not text.strip():
        return None
    domains: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, weight = part.partition(":")
        name = name.strip()
        if not name:
            raise UserError(f"--domains: {part!r} names no domain (use NAME or NAME:WEIGHT, comma-separated)")
        value = 1.0
        if sep:
            try:
                value = float(weight)
            except ValueError:
                raise UserError(f"--domains: weight {weight.strip()!r} of {name} is not a number") from None
            if not math.isfinite(value) or value <= 0:
                raise UserError(f"--domains: weight of {name} must be a positive number, got {weight.strip()}")
        if name in domains:
            raise UserError(f"--domains names {name} twice")
        domains[name] = value
    return domains or None


def parse_protect(text: str | None) -> dict[int, set[int]]:
    """``"3:7,3:12,5:0"`` -> {3: {7, 12}, 5: {0}}."""
    protect: dict[int, set[int]] = {}
    if not text:
        return protect
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        layer, sep, expert = part.partition(":")
        try:
            if not sep:
                raise ValueError
            layer_id, expert_id = int(layer), int(expert)
        except ValueError:
            raise UserError(f"--protect: {part!r} is not LAYER:EXPERT (e.g. 3:17)") from None
        protect.setdefault(layer_id, set()).add(expert_id)
    return protect


def make_plan(profile: Profile, options: PlanOptions) -> Plan:
    """A plan for `profile`'s model, chosen from its routing statistics as `options` say."""
    from compressor import __version__

    check_plan_options(options)
    layers = [int(layer) for layer in profile.model.moe_layers]
    if not layers:
        raise UserError(f"the profile of {profile.model.source} has no MoE layers")
    counts = {layer: int(profile.model.experts_per_layer[str(layer)]) for layer in layers}
    domains = _domain_weights(profile, options.domains)
    _check_protect(options.protect, counts)
    scores = expert_scores(profile, options.criterion, domains)

    min_keep = options.min_keep if options.min_keep is not None else options.top_k
    groups = None if options.ungroup else profile.model.expert_groups
    if options.keep_groups is not None and groups is None:
        raise UserError("--keep-groups applies to group-limited routers, which this model's is not"
                        + (" once --ungroup rewrites it" if options.ungroup else ""))
    if groups is not None and options.strategy != "uniform":
        raise UserError(f"--strategy {options.strategy} keeps different numbers of experts per expert group, but "
                        f"this model's router picks experts from the best {groups.chosen} of {groups.count} groups, "
                        "which must stay equal; use --strategy uniform, or --ungroup (plain top-k routing)")
    if options.strategy == "uniform":
        keep, parameters = _uniform(scores, counts, options, groups)
    elif options.strategy == "coverage":
        keep, parameters = _coverage(scores, counts, options, min_keep)
    else:
        keep, parameters = _global(scores, counts, options, min_keep)

    for layer in layers:
        kept_groups = (options.keep_groups or groups.count) if groups is not None else 1
        open_groups = min(groups.chosen, kept_groups) if groups is not None else 1
        reachable = open_groups * len(keep[layer]) // kept_groups
        if options.top_k > reachable:
            where = "" if groups is None else f" in the {open_groups} groups open to a token"
            raise UserError(
                f"--top-k {options.top_k} exceeds the {reachable} experts kept{where} in layer {layer}; "
                "lower --top-k or keep more experts"
            )
    parameters = {
        **parameters,
        "criterion": options.criterion,
        "domains": domains,
        "protect": {str(layer): sorted(ids) for layer, ids in sorted(options.protect.items())},
    }
    return Plan(
        tool_version=__version__,
        model=profile.model.model_copy(deep=True),
        top_k=options.top_k,
        compensation=options.compensation,
        ungroup=options.ungroup,
        layers={str(layer): LayerPlan(keep=sorted(keep[layer])) for layer in layers},
        strategy=StrategyRecord(name=options.strategy, parameters=parameters),
        profile_hash=profile.content_hash(),
        predicted_coverage=predicted_coverage(profile, keep),
    )


# -- scores ----------------------------------------------------------------------------------------


def expert_scores(profile: Profile, criterion: str, domains: dict[str, float]) -> dict[int, list[Fraction]]:
    """Per MoE layer, per expert: sum over domains of weight x (domain's criterion value / its layer total)."""
    statistic = CRITERIA[criterion]
    missing = [name for name in domains if any(
        getattr(stats, statistic) is None for stats in profile.domains[name].layers.values())]
    if missing:
        has = ", ".join(s for s in ("selected", "top1", "gate_mass", "reap")
                        if s in profile.statistics_available()) or "none"
        raise UserError(
            f"criterion {criterion!r} needs the {statistic} statistic, which this profile lacks "
            f"(it has: {has}); use --criterion frequency"
        )
    scores: dict[int, list[Fraction]] = {}
    for layer_id in profile.model.moe_layers:
        layer = str(int(layer_id))
        count = int(profile.model.experts_per_layer[layer])
        total = [Fraction(0)] * count
        for name, weight in domains.items():
            stats = profile.domains[name].layers.get(layer)
            if stats is None:
                raise UserError(f"domain {name} of the profile has no statistics for MoE layer {layer}")
            if len(stats.selected) != count:
                raise UserError(
                    f"domain {name}, layer {layer}: the profile has statistics for {len(stats.selected)} experts, "
                    f"but the model has {count}"
                )
            values = _criterion_values(stats, statistic)
            mass = sum(values)
            if mass <= 0:
                raise UserError(
                    f"domain {name} of the profile has no routing data in MoE layer {layer} (its {statistic} "
                    f"values sum to 0{', over 0 tokens' if not profile.domains[name].tokens else ''}): a plan from "
                    "it would keep experts by id order; profile the domain on real text or leave it out of --domains"
                )
            w = _exact(weight)
            total = [t + w * v / mass for t, v in zip(total, values)]
        scores[int(layer_id)] = total
    return scores


def _criterion_values(stats, statistic: str) -> list[Fraction]:
    if statistic == "reap":  # mean router-weighted activation norm per selection
        return [_exact(r) / s if s else Fraction(0) for r, s in zip(stats.reap, stats.selected)]
    return [_exact(v) for v in getattr(stats, statistic)]


def _exact(value) -> Fraction:
    """Exact rational of a number as written (0.1 -> 1/10, not the nearest binary float)."""
    if isinstance(value, int):
        return Fraction(value)
    return Fraction(repr(float(value)))


def _ranked(scores: list[Fraction]) -> list[int]:
    """Expert ids by descending score, lower id first among equal scores."""
    return sorted(range(len(scores)), key=lambda e: (-scores[e], e))


def predicted_coverage(profile: Profile, keep: dict[int, list[int]]) -> dict[str, dict[str, float]]:
    """Per domain and layer: share of the domain's routing decisions (`selected`) that land on kept experts.
    Layers where a domain made no routing decisions are left out."""
    coverage: dict[str, dict[str, float]] = {}
    for name, domain in profile.domains.items():
        shares: dict[str, float] = {}
        for layer, experts in sorted(keep.items()):
            stats = domain.layers.get(str(layer))
            if stats is None:
                continue
            total = sum(stats.selected)
            if total > 0:
                shares[str(layer)] = sum(stats.selected[e] for e in experts) / total
        coverage[name] = shares
    return coverage


# -- strategies ------------------------------------------------------------------------------------


def _uniform(scores, counts, options: PlanOptions, groups=None):
    """The same number of experts per layer; with expert `groups`, the same number in each kept group (the best of
    each; the `options.keep_groups` groups of highest total score, or all)."""
    smallest = min(counts.values())
    parts = (options.keep_groups or groups.count) if groups is not None else 1
    if groups is not None and not 1 <= parts <= groups.count:
        raise UserError(f"--keep-groups {parts}: this model's router has {groups.count} expert groups per layer")
    if options.keep is not None:
        keep_n = options.keep
        source = f"--keep {keep_n}"
    else:
        fraction = options.keep_fraction if options.keep_fraction is not None else DEFAULT_KEEP_FRACTION
        keep_n = parts * max(1, _round_half_up(_exact(fraction) * smallest / parts))
        source = f"--keep-fraction {fraction:g}"
    for layer, count in counts.items():
        if keep_n > count:
            raise UserError(f"{source} keeps {keep_n} experts per layer, but layer {layer} has only {count}")
    if groups is not None:
        why = f"this model's router picks experts from the best {groups.chosen} of {groups.count} expert groups"
        if keep_n % parts or keep_n // parts < groups.min_kept:
            raise UserError(f"{source}: {why}, so every kept group keeps the same number of experts, at least "
                            f"{groups.min_kept}: keep a multiple of {parts} of at least {parts * groups.min_kept}, "
                            "or plan with --ungroup (plain top-k routing)")
        if keep_n // parts > smallest // groups.count:
            raise UserError(f"{source}: {keep_n // parts} experts in each of {parts} groups, but a group has only "
                            f"{smallest // groups.count}; keep fewer experts or more groups")
    keep = {}
    for layer, layer_scores in scores.items():
        protected = options.protect.get(layer, set())
        if groups is None:
            keep[layer] = _fill(layer, layer_scores, protected, keep_n)
            continue
        size = counts[layer] // groups.count
        chosen = sorted(_best_groups(layer, layer_scores, size, protected, parts))
        keep[layer] = [expert for group in chosen for expert in _fill(
            layer, layer_scores[group * size:(group + 1) * size],
            {e - group * size for e in protected if e // size == group}, keep_n // parts, offset=group * size)]
    parameters = {"keep": keep_n}
    if options.keep_groups is not None:
        parameters["keep_groups"] = options.keep_groups
    if options.keep is None:
        parameters["keep_fraction"] = options.keep_fraction if options.keep_fraction is not None \
            else DEFAULT_KEEP_FRACTION
    return keep, parameters


def _best_groups(layer: int, layer_scores: list[Fraction], size: int, protected: set[int], count: int) -> list[int]:
    """The `count` expert groups (of `size` contiguous experts) with protected experts, then of highest total score
    (ties to the lower group)."""
    must = sorted({e // size for e in protected})
    if len(must) > count:
        raise UserError(f"layer {layer}: protected experts lie in {len(must)} expert groups, more than the {count} "
                        "the plan keeps")
    totals = [sum(layer_scores[g * size:(g + 1) * size], Fraction(0)) for g in range(len(layer_scores) // size)]
    rest = [g for g in sorted(range(len(totals)), key=lambda g: (-totals[g], g)) if g not in must]
    return must + rest[:count - len(must)]


def _fill(layer: int, layer_scores: list[Fraction], protected: set[int], budget: int,
          offset: int | None = None) -> list[int]:
    """Protected experts, then the best-scoring others, up to `budget` experts. With `offset`, the scores are
    those of experts offset.. (one expert group), and so are the ids returned."""
    if len(protected) > budget:
        where = f" of the group {offset}..{offset + len(layer_scores) - 1}" if offset is not None else ""
        raise UserError(
            f"layer {layer}: {len(protected)} experts{where} are protected, more than the {budget} the plan keeps there"
        )
    chosen = sorted(protected)
    for expert in _ranked(layer_scores):
        if len(chosen) >= budget:
            break
        if expert not in protected:
            chosen.append(expert)
    return [(offset or 0) + expert for expert in sorted(chosen)]


def _coverage(scores, counts, options: PlanOptions, min_keep: int):
    target = _exact(options.coverage if options.coverage is not None else DEFAULT_COVERAGE)
    keep = {}
    for layer, layer_scores in scores.items():
        count = counts[layer]
        protected = options.protect.get(layer, set())
        low = min(min_keep, count)
        high = min(options.max_keep if options.max_keep is not None else count, count)
        if len(protected) > high:
            raise UserError(
                f"layer {layer}: {len(protected)} experts are protected, more than --max-keep {high}"
            )
        mass = sum(layer_scores)
        chosen = sorted(protected)
        covered = sum((layer_scores[e] for e in chosen), Fraction(0))
        for expert in _ranked(layer_scores):
            if len(chosen) >= high:
                break
            if len(chosen) >= low and covered >= target * mass:
                break
            if expert not in protected:
                chosen.append(expert)
                covered += layer_scores[expert]
        keep[layer] = sorted(chosen)
    parameters = {"coverage": options.coverage if options.coverage is not None else DEFAULT_COVERAGE,
                  "min_keep": min_keep}
    if options.max_keep is not None:
        parameters["max_keep"] = options.max_keep
    return keep, parameters


def _global(scores, counts, options: PlanOptions, min_keep: int):
    fraction = options.keep_fraction if options.keep_fraction is not None else DEFAULT_KEEP_FRACTION
    total = sum(counts.values())
    budget = max(1, _round_half_up(_exact(fraction) * total))
    keep: dict[int, list[int]] = {}
    ceilings: dict[int, int] = {}
    for layer, layer_scores in scores.items():
        count = counts[layer]
        high = min(options.max_keep if options.max_keep is not None else count, count)
        protected = options.protect.get(layer, set())
        if len(protected) > high:
            raise UserError(
                f"layer {layer}: {len(protected)} experts are protected, more than --max-keep {high}"
            )
        ceilings[layer] = high
        keep[layer] = _fill(layer, layer_scores, protected, max(min(min_keep, count), len(protected)))
    floor = sum(len(chosen) for chosen in keep.values())
    ceiling = sum(ceilings.values())
    if budget < floor:
        raise UserError(
            f"--keep-fraction {fraction:g} allows {budget} of {total} experts, fewer than the {floor} that "
            f"--min-keep {min_keep} (and --protect) need over {len(counts)} layers; raise --keep-fraction "
            "or lower --min-keep"
        )
    if budget > ceiling:
        raise UserError(
            f"--keep-fraction {fraction:g} asks for {budget} of {total} experts, more than --max-keep "
            f"{options.max_keep} allows over {len(counts)} layers ({ceiling}); lower --keep-fraction or "
            "raise --max-keep"
        )
    candidates = sorted(
        ((-layer_scores[e], layer, e) for layer, layer_scores in scores.items()
         for e in range(len(layer_scores)) if e not in keep[layer]),
    )
    left = budget - floor
    for _, layer, expert in candidates:
        if left == 0:
            break
        if len(keep[layer]) < ceilings[layer]:
            keep[layer].append(expert)
            left -= 1
    keep = {layer: sorted(chosen) for layer, chosen in keep.items()}
    parameters = {"keep_fraction": fraction, "budget": budget, "min_keep": min_keep}
    if options.max_keep is not None:
        parameters["max_keep"] = options.max_keep
    return keep, parameters


def _round_half_up(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))


# -- checks ----------------------------------------------------------------------------------------


def check_plan_options(options: PlanOptions) -> None:
    """UserError for options that no profile could make work (checked before the profile is read)."""
    if options.strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {options.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if options.criterion not in CRITERIA:
        raise UserError(f"unknown criterion {options.criterion!r}; choose one of {', '.join(CRITERIA)}")
    if options.compensation not in COMPENSATIONS:
        raise UserError(f"unknown compensation {options.compensation!r}; choose one of {', '.join(COMPENSATIONS)}")
    if options.keep is not None and options.keep_fraction is not None:
        raise UserError("--keep and --keep-fraction are mutually exclusive; give one of them")
    if options.keep is not None and options.keep < 1:
        raise UserError(f"--keep must be at least 1, got {options.keep}")
    if options.keep_fraction is not None and not (0 < options.keep_fraction <= 1):
        raise UserError(f"--keep-fraction must be in (0, 1], got {options.keep_fraction:g}")
    if options.coverage is not None and not (0 < options.coverage <= 1):
        raise UserError(f"--coverage must be in (0, 1] (a share of routing mass, e.g. 0.9), got {options.coverage:g}")
    if options.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {options.top_k}")
    if options.keep_groups is not None and (options.keep_groups < 1 or options.strategy != "uniform"):
        raise UserError(f"--keep-groups must be at least 1 and goes with --strategy uniform, got {options.keep_groups}"
                        f" with --strategy {options.strategy}")
    if options.min_keep is not None and options.min_keep < 1:
        raise UserError(f"--min-keep must be at least 1, got {options.min_keep}")
    if options.min_keep is not None and options.min_keep < options.top_k:
        raise UserError(f"--min-keep {options.min_keep} is below --top-k {options.top_k}: every layer must keep "
                        "at least top_k experts")
    if options.max_keep is not None and options.max_keep < max(options.min_keep or 1, options.top_k):
        raise UserError(f"--max-keep {options.max_keep} is below --min-keep/--top-k "
                        f"{max(options.min_keep or 1, options.top_k)}")
    name = options.strategy
    if name == "uniform":
        for flag, value in (("--coverage", options.coverage), ("--min-keep", options.min_keep),
                            ("--max-keep", options.max_keep)):
            if value is not None:
                raise UserError(f"{flag} does not apply to --strategy uniform (it keeps the same number per layer: "
                                "--keep N or --keep-fraction F)")
    elif name == "coverage":
        for flag, value in (("--keep", options.keep), ("--keep-fraction", options.keep_fraction)):
            if value is not None:
                raise UserError(f"{flag} does not apply to --strategy coverage (it keeps, per layer, the fewest "
                                "experts covering --coverage C of the routing mass)")
    else:
        for flag, value in (("--keep", options.keep), ("--coverage", options.coverage)):
            if value is not None:
                raise UserError(f"{flag} does not apply to --strategy global (its total budget is --keep-fraction F "
                                "of all routed experts, spread over layers by score)")


def _domain_weights(profile: Profile, domains: dict[str, float] | None) -> dict[str, float]:
    if not profile.domains:
        raise UserError(f"the profile of {profile.model.source} has no domains")
    if domains is None:
        return {name: 1.0 for name in profile.domains}
    unknown = [name for name in domains if name not in profile.domains]
    if unknown:
        raise UserError(f"unknown domain {unknown[0]!r}; the profile has domains: {', '.join(profile.domains)}")
    for name, weight in domains.items():
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise UserError(f"domain {name}: weight must be a positive number, got {weight!r}")
    if not domains:
        raise UserError("no domains selected")
    return {name: float(weight) for name, weight in domains.items()}


def _check_protect(protect: dict[int, set[int]], counts: dict[int, int]) -> None:
    for layer, experts in sorted(protect.items()):
        if layer not in counts:
            raise UserError(f"--protect names layer {layer}, which is not an MoE layer (MoE layers: {format_ranges(counts)})")
        for expert in sorted(experts):
            if not 0 <= expert < counts[layer]:
                raise UserError(f"--protect {layer}:{expert}: layer {layer} has experts 0..{counts[layer] - 1}")
