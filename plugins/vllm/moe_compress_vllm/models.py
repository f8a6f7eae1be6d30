"""Per-layer-count variants of vLLM's MoE model classes (imported by vLLM when a checkpoint names one).

`per_layer_variant(Base, count_key)` is `Base` built with each MoE layer's own expert count: while `Base.__init__`
builds its decoder layers (vLLM's ``make_layers``, called by the family's model module), the config's `count_key`
holds the count of the layer being built, so vLLM's own MoE block, router and fused-MoE layer (``FusedMoE``) are
sized for that layer, and the original count is restored before anything else reads it. Weights load through
vLLM's own loader: each layer's fused-MoE layer takes the experts it has, and the config's count (the largest
layer's) sizes the expert-name mapping of the families that build one.
"""

from __future__ import annotations

import importlib

from moe_compress_vllm import ARCHITECTURES, PER_LAYER_KEY


def layer_counts(config, count_key: str) -> dict[int, int]:
    """{layer index: expert count} from the config's PER_LAYER_KEY (a mapping, or a list with None for dense layers);
    ValueError when a count is not a positive integer or exceeds the config's `count_key`."""
    counts = getattr(config, PER_LAYER_KEY, None) or {}
    if isinstance(counts, (list, tuple)):
        counts = {i: c for i, c in enumerate(counts) if c is not None}
    largest = getattr(config, count_key)
    out = {}
    for layer, count in dict(counts).items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{PER_LAYER_KEY}[{layer!r}] must be a positive integer, not {count!r}")
        if count > largest:
            raise ValueError(f"{PER_LAYER_KEY} gives layer {layer} {count} experts, more than {count_key}={largest} "
                             "(the largest layer's count, which sizes vLLM's expert weight mapping)")
        out[int(layer)] = count
    return out


def per_layer_variant(base: type, module, count_key: str, name: str) -> type:
    """A subclass of vLLM's `base` (defined in `module`) whose MoE layers take their counts from PER_LAYER_KEY."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_text_config
        counts = layer_counts(config, count_key)
        parallel = vllm_config.parallel_config
        if counts and (parallel.enable_expert_parallel or parallel.enable_eplb):
            raise ValueError(f"{name}: expert parallelism and EPLB place experts by one count per model; serve "
                             "per-layer expert counts with tensor parallelism only")
        make_layers = module.make_layers

        def sized_make_layers(num_layers, layer_fn, prefix):
            def build(prefix):
                count = counts.get(int(prefix.rsplit(".", 1)[-1]))
                if count is None:
                    return layer_fn(prefix=prefix)
                largest = getattr(config, count_key)
                setattr(config, count_key, count)
                try:
                    return layer_fn(prefix=prefix)
                finally:
                    setattr(config, count_key, largest)

            return make_layers(num_layers, build, prefix)

        module.make_layers = sized_make_layers
        try:
            base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        finally:
            module.make_layers = make_layers

    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})


def __getattr__(name: str) -> type:
    if name not in ARCHITECTURES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, class_name, count_key = ARCHITECTURES[name]
    module = importlib.import_module(module_name)
    cls = per_layer_variant(getattr(module, class_name), module, count_key, name)
    globals()[name] = cls
    return cls
