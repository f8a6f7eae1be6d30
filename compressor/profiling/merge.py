"""Merge profiles of the same model: different domains, or the same domain measured in parts (exact sums)."""

from __future__ import annotations

from compressor import __version__
from compressor.errors import UserError
from compressor.profiling.schema import DomainProfile, LayerStatistics, Profile, SourceDescription

_SUMMED = ("selected", "top1", "gate_mass", "reap", "top1_routed_cosine_sum", "top1_layer_cosine_sum", "cosine_tokens")


def merge_profiles(profiles: list[Profile]) -> Profile:
    if not profiles:
        raise UserError("nothing to merge")
    first = profiles[0]
    for other in profiles[1:]:
        for key in ("family", "config_hash", "experts_per_layer", "top_k"):  # config_hash ignores top_k
            if getattr(other.model, key) != getattr(first.model, key):
                raise UserError(
                    f"cannot merge profiles of different models ({key} differs: "
                    f"{first.model.source} vs {other.model.source})"
                )
    domains: dict[str, DomainProfile] = {}
    for profile in profiles:
        for name, domain in profile.domains.items():
            domains[name] = _merge_domain(domains[name], domain) if name in domains else domain.model_copy(deep=True)
    settings = first.settings.model_copy()
    if any(p.settings != first.settings for p in profiles[1:]):
        settings = settings.model_copy(update={"max_tokens": None})
    return Profile(tool_version=__version__, model=first.model, settings=settings, domains=domains)


def _merge_domain(a: DomainProfile, b: DomainProfile) -> DomainProfile:
    if set(a.layers) != set(b.layers):
        raise UserError("cannot merge: the profiles cover different MoE layers")
    layers = {layer: _merge_layer(a.layers[layer], b.layers[layer]) for layer in a.layers}
    parts = a.source.details.get("parts", [a.source.model_dump()]) + b.source.details.get("parts", [b.source.model_dump()])
    source = SourceDescription(kind="merged", spec=" + ".join(p["spec"] for p in parts), details={"parts": parts})
    sequences = None if a.sequences is None or b.sequences is None else a.sequences + b.sequences
    return DomainProfile(tokens=a.tokens + b.tokens, sequences=sequences, source=source, layers=layers)


def _merge_layer(a: LayerStatistics, b: LayerStatistics) -> LayerStatistics:
    if len(a.selected) != len(b.selected):
        raise UserError("cannot merge: a layer has different expert counts in the two profiles")
    merged = {}
    for key in _SUMMED:
        x, y = getattr(a, key), getattr(b, key)
        if x is None or y is None:
            merged[key] = None  # a statistic is only kept where every part has it
        elif isinstance(x, list):
            merged[key] = [p + q for p, q in zip(x, y)]
        else:
            merged[key] = x + y
    return LayerStatistics(**merged)
