"""Variants of vLLM's MoE model classes (imported by vLLM when a checkpoint names one).

`variant(Base, module, name, count_key)` is `Base` built with each MoE layer's own expert count: while `Base.__init__`
builds its decoder layers (vLLM's ``make_layers``, called by the family's model module), the config's `count_key`
holds the count of the layer being built, so vLLM's own MoE block, router and fused-MoE layer (``FusedMoE``) are
sized for that layer, and the original count is restored before anything else reads it. Weights load through
vLLM's own loader: each layer's fused-MoE layer takes the experts it has, and the config's count (the largest
layer's) sizes the expert-name mapping of the families that build one. With `cpu_routing`, on the CPU platform the
module's ``FusedMoEFactory`` gets `cpu_routing_arguments` while `Base.__init__` runs (see the package docstring).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect

from moe_compress_vllm import ARCHITECTURES, CPU_ROUTING, CPU_SUFFIX, PER_LAYER_KEY


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


def cpu_routing_arguments(arguments: dict) -> dict:
    """``FusedMoEFactory`` keyword arguments with which vLLM's CPU router routes as `arguments` mean: ungrouped
    routing by sigmoid scores or with a selection bias (which its plain top-k runs as softmax without the bias) through
    its grouped router, one group, all of it open; other arguments as they are."""
    if arguments.get("use_grouped_topk") or arguments.get("custom_routing_function") is not None:
        return arguments
    if arguments.get("scoring_func", "softmax") == "softmax" and arguments.get("e_score_correction_bias") is None:
        return arguments
    arguments = {**arguments, "use_grouped_topk": True, "num_expert_group": 1, "topk_group": 1}
    if arguments["num_experts"] < 2:  # its group score with a bias is the sum of the best two; one expert: no choice
        arguments["e_score_correction_bias"] = None
    return arguments


@contextlib.contextmanager
def _replaced(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def variant(base: type, module, name: str, count_key: str | None = None, cpu_routing: bool = False) -> type:
    """A subclass of vLLM's `base` (defined in `module`): with `count_key`, its MoE layers take their counts from
    PER_LAYER_KEY; with `cpu_routing`, on the CPU platform its fused-MoE layers route by `cpu_routing_arguments`."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        from vllm.platforms import current_platform

        with contextlib.ExitStack() as stack:
            if count_key:
                stack.enter_context(_replaced(module, "make_layers", _sized_make_layers(vllm_config, module,
                                                                                         count_key, name)))
            if cpu_routing and current_platform.is_cpu():
                factory = module.FusedMoEFactory
                signature = inspect.signature(factory)

                def cpu_routed_factory(*args, **kwargs):
                    return factory(**cpu_routing_arguments(signature.bind(*args, **kwargs).arguments))

                stack.enter_context(_replaced(module, "FusedMoEFactory", cpu_routed_factory))
            base.__init__(self, vllm_config=vllm_config, prefix=prefix)

    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})


def _sized_make_layers(vllm_config, module, count_key: str, name: str):
    """`module`'s ``make_layers``, building each listed layer with the config's `count_key` at that layer's count."""
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

    return sized_make_layers


def __getattr__(name: str) -> type:
    if name in ARCHITECTURES:
        module_name, class_name, count_key = ARCHITECTURES[name]
        cpu_routing = class_name in CPU_ROUTING
    elif name.endswith(CPU_SUFFIX) and name[:-len(CPU_SUFFIX)] in CPU_ROUTING:
        class_name, count_key, cpu_routing = name[:-len(CPU_SUFFIX)], None, True
        module_name = CPU_ROUTING[class_name]
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(module_name)
    cls = variant(getattr(module, class_name), module, name, count_key, cpu_routing)
    globals()[name] = cls
    return cls
