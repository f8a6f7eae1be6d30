"""The model-family interface: what stages need to know about a family, so that no stage branches on it.

An adapter describes a family in terms of its own config keys (which layers are MoE, how many experts, the
routing rule) and the attribute names of its MoE block (router, fused experts, shared experts). Everything
else comes from transformers: the on-disk tensor layout from its checkpoint conversion mapping
(`families.layout`), the modules themselves (`families.moe_block`), loading and saving.

Methods take the plain config dict read from ``config.json``.
"""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from compressor.errors import UserError

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
PER_LAYER_KEY = "n_routed_experts_per_layer"


@dataclass(frozen=True)
class RouterSpec:
    """How a family's router picks and weights experts (applied by `moe_block.route`).

    - scoring: ``softmax`` or ``sigmoid`` of the router logits;
    - top_k: experts per token; renormalize: chosen weights renormalised to sum 1 (+ `renorm_eps`);
    - topk_method: ``greedy``, ``group_limited_greedy`` (top-k within the `topk_group` best of `n_group`
      contiguous groups, a group scored by its best expert) or ``noaux_tc`` (groups scored by their two best
      biased scores);
    - routed_scaling_factor: multiplies the routed weights;
    - correction_bias: a selection-only bias (``e_score_correction_bias``) added to the scores to choose experts;
    - logits_fp32: logits computed in fp32 (else in the hidden states' dtype, then softmax in fp32);
      weights_fp32: the weights handed to the experts in fp32 (None: as logits_fp32; ERNIE casts them back,
      Mixtral and MiniMax-M2 keep their fp32 weights);
    - softmax_after_topk: top-k on the logits, then softmax over the chosen ones (gpt-oss).
    """

    scoring: str
    top_k: int
    renormalize: bool
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False
    logits_fp32: bool = False
    weights_fp32: bool | None = None
    softmax_after_topk: bool = False
    renorm_eps: float = 0.0

    def __post_init__(self):
        if self.scoring not in SCORING_FUNCS:
            raise UserError(f"unsupported router scoring function {self.scoring!r}; supported: {', '.join(SCORING_FUNCS)}")
        if self.topk_method not in TOPK_METHODS:
            raise UserError(f"unsupported router topk_method {self.topk_method!r}; supported: {', '.join(TOPK_METHODS)}")

    @property
    def grouped(self) -> bool:
        """Whether expert choice is restricted to groups (so pruning must keep the groups balanced)."""
        return self.topk_method in ("group_limited_greedy", "noaux_tc") and self.n_group > 1

    @property
    def min_kept_per_group(self) -> int:
        """Fewest experts a group can keep: ``noaux_tc`` scores a group by its two best experts."""
        return 2 if self.topk_method == "noaux_tc" else 1


@dataclass(frozen=True)
class TensorRole:
    """What an on-disk tensor is: kind ``expert`` (a routed expert's tensor, or all experts' when fused on disk),
    ``router``, ``shared_expert`` or ``other``; its decoder layer (None outside the layers) and expert (None
    unless a per-expert tensor)."""

    kind: str
    layer: int | None
    expert: int | None


class FamilyAdapter:
    """One model family: a set of ``model_type`` values sharing config semantics and MoE-block structure.

    Subclasses set the class attributes and implement `is_moe_layer` and `router`; the rest is generic.
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    expert_count_key: ClassVar[str]
    top_k_key: ClassVar[str] = "num_experts_per_tok"
    # the MoE block, relative to a decoder layer, and its parts, relative to the block
    block_attr: ClassVar[str] = "mlp"
    router_attr: ClassVar[str] = "gate"
    experts_attr: ClassVar[str] = "experts"
    shared_attrs: ClassVar[tuple[str, ...]] = ()  # modules whose outputs add to the routed output
    shared_gate_attr: ClassVar[str | None] = None  # sigmoid gate on the shared output (Qwen2-MoE)
    # the selection-only bias (where the family has one), relative to the block: a router buffer, or the block's own
    correction_bias_path: ClassVar[str] = "gate.e_score_correction_bias"
    # the experts' layout flags (is_transposed, is_concatenated, has_bias, has_gate) where the experts module does not
    # carry transformers' own (gpt-oss's hand-written experts)
    experts_layout: ClassVar[dict] = {}
    block_returns_tuple: ClassVar[bool] = False  # the block returns (hidden states, router scores) (gpt-oss)
    # the quantization_config of the family's own MXFP4 checkpoints, whose fused experts parameters [E, in, out] are
    # stored as MXFP4 ``_blocks`` / ``_scales`` (`families.quantization`) and which transformers loads: what
    # `moe-compress quantize --scheme mxfp4` writes; None: the family has no such format
    mxfp4_quantization_config: ClassVar[dict | None] = None
    # transformers' classes (module path, class name); None: found through transformers' Auto mappings
    model_class_path: ClassVar[tuple[str, str] | None] = None
    config_class_path: ClassVar[tuple[str, str] | None] = None
    per_layer_counts_native: ClassVar[bool] = False  # the model class itself reads PER_LAYER_KEY
    vllm_architectures: ClassVar[tuple[str, ...]] = ()  # vLLM classes that serve the uniform outputs
    # the architecture per-layer outputs name in config.json, which moe-compress's vLLM plugin (plugins/vllm) registers
    # as vLLM's class with each MoE layer at its own count; None: vLLM cannot serve per-layer outputs of this family
    vllm_per_layer_architecture: ClassVar[str | None] = None
    vllm_reads_shipped_config: ClassVar[str | None] = None  # the shipped configuration file vLLM must read
    vllm_cpu_workaround: ClassVar[tuple[str, str] | None] = None  # (--compilation-config for vLLM's CPU build, why)
    vllm_cpu_engine_args: ClassVar[dict] = {}  # engine arguments vLLM's CPU build needs for this family
    vllm_cpu_dtype: ClassVar[str | None] = None  # the dtype vLLM's CPU build must run the family in (None: any)
    # why vLLM's CPU build routes this family's outputs as transformers does only with moe-compress's vLLM plugin (on
    # the CPU platform it registers a variant of vllm_architectures[0] that routes through vLLM's grouped CPU router)
    vllm_cpu_plugin_routing: ClassVar[str | None] = None
    # config.json values vLLM reads to route as transformers does (transformers' config class may not write them)
    vllm_routing_keys: ClassVar[dict] = {}

    # -- structure --------------------------------------------------------------------------------

    def num_layers(self, config: Mapping) -> int:
        return config_int(config, "num_hidden_layers", minimum=1)

    def key_in(self, config: Mapping, key: str) -> str:
        """The spelling of `key` that config.json uses: `key` itself or an alias from the config class's
        attribute_map (transformers 5 writes Qwen3-MoE's ``num_experts`` as ``num_local_experts``)."""
        aliases = getattr(self.config_class(config), "attribute_map", {}) or {}
        for candidate in (key, aliases.get(key), *(a for a, target in aliases.items() if target == key)):
            if candidate and config.get(candidate) is not None:
                return candidate
        return key

    def setting(self, config: Mapping, key: str):
        """`key` of config.json, or the family's config class default when config.json leaves it out (the value
        transformers would use)."""
        value = config.get(self.key_in(config, key))
        if value is not None:
            return value
        defaults = _DEFAULTS.get(type(self))
        if defaults is None:
            defaults = _DEFAULTS[type(self)] = self.config_class(config)()
        return getattr(defaults, key, None)

    def is_moe_layer(self, config: Mapping, layer: int) -> bool:
        """Whether decoder layer `layer` has routed experts (the family's own rule)."""
        raise NotImplementedError

    def moe_layers(self, config: Mapping) -> list[int]:
        return [layer for layer in range(self.num_layers(config)) if self.is_moe_layer(config, layer)]

    def num_experts(self, config: Mapping, layer: int) -> int:
        """Routed experts in MoE layer `layer` (PER_LAYER_KEY first, then the family's count key)."""
        if not 0 <= layer < self.num_layers(config) or not self.is_moe_layer(config, layer):
            raise UserError(f"layer {layer} is not an MoE layer of this {self.name} model")
        per_layer = per_layer_counts(config.get(PER_LAYER_KEY))
        if str(int(layer)) in per_layer:
            return per_layer[str(int(layer))]
        return config_int(config, self.key_in(config, self.expert_count_key), minimum=1)

    def top_k(self, config: Mapping) -> int:
        return config_int(config, self.key_in(config, self.top_k_key), minimum=1)

    def router(self, config: Mapping) -> RouterSpec:
        """The routing rule of this config."""
        raise NotImplementedError

    # -- pruning ----------------------------------------------------------------------------------

    def check_kept(self, config: Mapping, kept: Mapping, top_k: int) -> dict[int, list[int]]:
        """Validate a keep-plan against `config`; return it with int keys and int expert lists."""
        moe = self.moe_layers(config)
        plan: dict[int, list[int]] = {}
        for layer, experts in kept.items():
            try:
                layer = int(layer)
                experts = [int(e) for e in experts]
            except (TypeError, ValueError):
                raise UserError(f"keep-plan: layer {layer!r} must map to a list of expert indices") from None
            if layer not in moe:
                raise UserError(f"keep-plan names layer {layer}, which is not an MoE layer (MoE layers: "
                                f"{format_ranges(moe)})")
            count = self.num_experts(config, layer)
            if not experts:
                raise UserError(f"keep-plan: layer {layer} must keep at least one expert")
            if len(set(experts)) != len(experts):
                raise UserError(f"keep-plan: layer {layer} lists an expert twice")
            bad = [e for e in experts if not 0 <= e < count]
            if bad:
                raise UserError(f"keep-plan: layer {layer} has experts 0..{count - 1}, not {bad[0]}")
            plan[layer] = experts
        missing = [layer for layer in moe if layer not in plan]
        if missing:
            raise UserError(f"keep-plan has no entry for MoE layers {format_ranges(missing)}")
        if int(top_k) < 1:
            raise UserError(f"top_k must be at least 1, got {top_k}")
        smallest = min(plan, key=lambda layer: len(plan[layer]), default=None)
        if smallest is not None and int(top_k) > len(plan[smallest]):
            raise UserError(f"top_k={top_k} exceeds the {len(plan[smallest])} experts kept in layer {smallest}")
        self.check_routing_structure(config, plan, int(top_k))
        return plan

    def check_routing_structure(self, config: Mapping, plan: dict[int, list[int]], top_k: int) -> None:
        """Constraints on a keep-plan beyond counts: a group-limited router's groups stay balanced and
        contiguous (`check_balanced_groups`); UserError otherwise."""
        router = self.router(config)
        if router.grouped:
            check_balanced_groups(self, config, plan, top_k, router)
            return
        for layer, experts in sorted(plan.items()):
            if len(experts) < router.min_kept_per_group:
                raise UserError(f"the router ({router.topk_method}) scores its expert group by the "
                                f"{router.min_kept_per_group} best experts, so every layer must keep at least "
                                f"{router.min_kept_per_group}; layer {layer} keeps {len(experts)}")

    def ungrouped(self, config: Mapping) -> dict:
        """`config` with group-limited routing rewritten to plain top-k (unchanged for families without groups)."""
        return dict(config)

    def regrouped(self, config: Mapping, groups: int, chosen: int) -> dict:
        """`config` routing over `groups` expert groups, `chosen` of them open per token (families with groups)."""
        raise UserError(f"{self.name} has no expert groups to change")

    def expert_groups(self, config: Mapping) -> dict | None:
        """A group-limited router's groups as planning sees them: ``count`` contiguous groups per MoE layer,
        ``chosen`` of them open to each token, ``min_kept`` experts at least per group; None without groups."""
        router = self.router(config)
        if not router.grouped:
            return None
        return {"count": router.n_group, "chosen": router.topk_group, "min_kept": router.min_kept_per_group}

    def pruned_config(self, config: Mapping, kept: Mapping, top_k: int, *, ungroup: bool = False) -> dict:
        """config.json of the output: the family's expert count key (the largest kept count), PER_LAYER_KEY for
        layers that keep fewer (and `architectures` naming the per-layer vLLM variant), the top-k key and the family's
        vllm_routing_keys.
        `kept[layer]` lists old expert ids in their new order. `ungroup=True` rewrites a grouped router to plain
        top-k (any plan is then valid); a plan that drops whole expert groups lowers the group count (and the open
        groups to at most that)."""
        if ungroup:
            config = self.ungrouped(config)
        plan = self.check_kept(config, kept, top_k)
        counts = {layer: len(experts) for layer, experts in plan.items()}
        new = copy.deepcopy(dict(config))
        router = self.router(config)
        if router.grouped and plan:  # whole groups dropped (check_kept: as many in every layer): fewer groups
            layer, experts = next(iter(plan.items()))
            groups = len({expert // (self.num_experts(config, layer) // router.n_group) for expert in experts})
            if groups < router.n_group:
                new.update(self.regrouped(config, groups, min(router.topk_group, groups)))
        new.pop(PER_LAYER_KEY, None)
        if counts:
            largest = max(counts.values())
            new[self.key_in(config, self.expert_count_key)] = largest
            differing = {str(layer): count for layer, count in sorted(counts.items()) if count != largest}
            if differing:
                new[PER_LAYER_KEY] = differing
        if self.vllm_per_layer_architecture:
            per_layer = PER_LAYER_KEY in new
            if per_layer or new.get("architectures") == [self.vllm_per_layer_architecture]:
                new["architectures"] = [self.vllm_per_layer_architecture if per_layer else self.vllm_architectures[0]]
        new[self.key_in(config, self.top_k_key)] = int(top_k)
        new.update(self.vllm_routing_keys)  # transformers ignores them; vLLM then routes as transformers does
        return new

    def compensation_config(self, config: Mapping, compensation: str) -> dict:
        """Config keys a compensation mode needs in the output (`renorm`: renormalise the chosen weights)."""
        if compensation == "renorm":
            return {"norm_topk_prob": True}
        return {}

    def native_transformers_support(self, config: Mapping, kept: Mapping, top_k: int, *,
                                    ungroup: bool = False) -> str | None:
        """None if plain transformers loads the pruned output without custom code, else the reason."""
        try:
            counts = {len(experts) for experts in
                      self.check_kept(self.ungrouped(config) if ungroup else config, kept, top_k).values()}
        except UserError as error:
            return str(error)
        if len(counts) > 1 and not self.per_layer_counts_native:
            return (f"transformers' {self.name} needs the same expert count in every layer; the output ships "
                    "moe-compress's per-layer modeling file (load it with trust_remote_code=True)")
        return None

    # -- serving ----------------------------------------------------------------------------------

    def vllm_problem(self, config: Mapping) -> str | None:
        """Why vLLM would compute something else than transformers on an output with `config`, or None."""
        wrong = {key: value for key, value in self.vllm_routing_keys.items() if config.get(key) != value}
        if wrong:
            return (f"vLLM's {self.name} reads {' and '.join(wrong)} from config.json and would route otherwise than "
                    "transformers (what moe-compress exported and validated with); set "
                    f"{', '.join(f'{key}: {json.dumps(value)}' for key, value in wrong.items())} (as the published "
                    "configs do)")
        return None

    # -- in memory --------------------------------------------------------------------------------

    def config_class(self, config: Mapping) -> type:
        if self.config_class_path:
            return _import(*self.config_class_path)
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return CONFIG_MAPPING[config.get("model_type")]

    def base_model_class(self, config: Mapping) -> type:
        """The family's causal-LM class."""
        if self.model_class_path:
            return _import(*self.model_class_path)
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        return MODEL_FOR_CAUSAL_LM_MAPPING[self.config_class(config)]

    def model_class(self, config: Mapping) -> type:
        """The causal-LM class that runs `config`: the family's, or its per-layer-count variant when the config
        keeps different numbers of experts per layer and the family's class cannot."""
        base = self.base_model_class(config)
        if config.get(PER_LAYER_KEY) and not self.per_layer_counts_native:
            from compressor.families.per_layer import per_layer_class

            return per_layer_class(base, self.expert_count_key, self.block_attr)
        return base

    def build_config(self, config: Mapping):
        """A config object of `config_class` built from the config dict."""
        data = copy.deepcopy(dict(config))
        data.pop("auto_map", None)  # our own classes load the model; remote code is never run
        return self.config_class(config).from_dict(data)

    def write_runtime_files(self, directory, config: Mapping) -> None:
        """Files the output needs besides weights and config.json to load: the per-layer modeling file when
        the family's class cannot hold different expert counts per layer."""
        if config.get(PER_LAYER_KEY) and not self.per_layer_counts_native:
            from compressor.families.per_layer import write_per_layer_modeling

            write_per_layer_modeling(directory, self.base_model_class(config), self.expert_count_key, self.block_attr)

    def decoder_layer_path(self, layer: int) -> str:
        """The decoder layer's module path in the causal LM (for ``get_submodule``)."""
        return f"model.layers.{int(layer)}"

    embedding_path: ClassVar[str] = "model.embed_tokens"
    final_norm_path: ClassVar[str] = "model.norm"
    lm_head_path: ClassVar[str] = "lm_head"
    rotary_path: ClassVar[str] = "model.rotary_emb"

    def router_tensors(self, block):
        """(weight [E, H], logit bias [E] or None, selection-only correction bias [E] or None) of a live block."""
        router = getattr(block, self.router_attr)
        bias = getattr(router, "bias", None)
        correction = block
        for name in self.correction_bias_path.split("."):
            correction = getattr(correction, name, None)
        if correction is not None:
            correction = correction.reshape(-1)  # ERNIE keeps it as [1, E]
        return router.weight, bias if isinstance(bias, type(router.weight)) else None, correction

    def check_config(self, config: Mapping) -> None:
        """UserError (naming the key) when config.json's values cannot describe a model of this family: wrong
        types, counts below 1, top-k outside 1..experts, or values the config class itself refuses; a quantization
        other than fine-grained FP8."""
        from compressor.families.quantization import block_size

        block_size(config)
        layers = config_int(config, "num_hidden_layers", minimum=1)
        config_int(config, "hidden_size", minimum=1)
        config_int(config, "vocab_size", minimum=1)
        top_k = self.top_k(config)
        try:
            moe = [layer for layer in range(layers) if self.is_moe_layer(config, layer)]
            counts = {layer: self.num_experts(config, layer) for layer in moe}
        except (TypeError, ValueError) as error:
            raise UserError(f"config.json ({self.name}) has a value of the wrong type: {error}") from None
        for layer, count in counts.items():
            if top_k > count:
                raise UserError(f"config.json ({self.name}): {self.top_k_key}={top_k} exceeds the {count} routed "
                                f"experts of layer {layer}")
        for layer in per_layer_counts(config.get(PER_LAYER_KEY)):
            if int(layer) not in counts:
                raise UserError(f"config.json ({self.name}): {PER_LAYER_KEY} names layer {layer}, which is not an "
                                f"MoE layer (MoE layers: {format_ranges(moe)})")
        self.router(config)
        try:
            self.build_config(config)
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise UserError(f"config.json ({self.name}) is not valid: {' '.join(str(error).split())}") from None

    def __repr__(self) -> str:
        return f"<family {self.name} (model_type {', '.join(self.model_types)})>"


def check_balanced_groups(family, config, plan: dict[int, list[int]], top_k: int, router: RouterSpec) -> None:
    """A plan for a group-limited router keeps the same number of experts (at least `router.min_kept_per_group`) in
    each group it keeps, the same number of groups in every layer (a whole group may go), and lists them group by
    group, so the output's contiguous groups are the original ones; UserError with the fix otherwise."""
    n_group = router.n_group
    where = (f"the router picks experts from the best {router.topk_group} of {n_group} expert groups "
             f"({router.topk_method})")
    changed = sorted((k, v) for k, v in family.ungrouped(config).items() if config.get(k) != v)
    hint = (f"or plan with --ungroup (route without groups: {', '.join(f'{k}: {v}' for k, v in changed)}; "
            "tokens may then pick experts outside their best groups)")
    groups_kept: dict[int, int] = {}
    for layer, experts in sorted(plan.items()):
        total = family.num_experts(config, layer)
        if total % n_group:
            raise UserError(f"layer {layer}: {total} experts cannot form {n_group} equal groups ({where})")
        size = total // n_group
        per_group = [0] * n_group
        for expert in experts:
            per_group[expert // size] += 1
        sizes = {c for c in per_group if c}
        if len(sizes) > 1:
            raise UserError(f"{where}, so every group keeps the same number of experts (or none: a whole group may "
                            f"go); layer {layer} keeps {per_group} from groups 0..{n_group - 1}. Balance the plan, "
                            f"{hint}")
        per, kept = sizes.pop(), sum(1 for c in per_group if c)
        if per < router.min_kept_per_group:
            raise UserError(f"{where}, which scores a group by its {router.min_kept_per_group} best experts; layer "
                            f"{layer} keeps {per} per group. Keep at least {router.min_kept_per_group} per group, "
                            f"{hint}")
        for block in range(kept):
            if len({expert // size for expert in experts[block * per:(block + 1) * per]}) != 1:
                raise UserError(f"{where}; layer {layer} must list its kept experts group by group (new group {block} "
                                f"= kept positions {block * per}..{(block + 1) * per - 1}), e.g. in ascending order")
        open_groups = min(router.topk_group, kept)
        if top_k > open_groups * per:
            raise UserError(f"{where}; top_k={top_k} exceeds the {open_groups * per} experts left in "
                            f"{open_groups} groups of {per} (layer {layer}). Keep more experts per group, {hint}")
        groups_kept[layer] = kept
    if len(set(groups_kept.values())) > 1:
        first, count = next(iter(groups_kept.items()))
        other = next(layer for layer, n in groups_kept.items() if n != count)
        raise UserError(f"{where}; the group count is one setting for all layers, so every layer must keep the same "
                        f"number of groups: layer {first} keeps {count}, layer {other} keeps {groups_kept[other]}")


def config_int(config: Mapping, key: str, *, default=None, minimum: int = 0) -> int:
    """An integer of config.json (`default` when absent or null); UserError naming the key otherwise."""
    value = config.get(key)
    if value is None:
        if default is None:
            raise UserError(f"config.json lacks {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"config.json: {key} must be an integer of at least {minimum}, not {value!r}")
    return value


def config_float(config: Mapping, key: str, default: float) -> float:
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"config.json: {key} must be a number, not {value!r}")
    return float(value)


def config_bool(config: Mapping, key: str, default: bool) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise UserError(f"config.json: {key} must be true or false, not {value!r}")
    return value


def per_layer_counts(counts) -> dict[str, int]:
    """PER_LAYER_KEY as ``{"<layer>": count}`` (a list with ``null`` for dense layers is accepted too)."""
    if not counts:
        return {}
    if isinstance(counts, (list, tuple)):
        counts = {str(i): c for i, c in enumerate(counts) if c is not None}
    if not isinstance(counts, Mapping):
        raise UserError(f"config.json: {PER_LAYER_KEY} must map layer indices to expert counts")
    out = {}
    for layer, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise UserError(f"config.json: {PER_LAYER_KEY}[{layer!r}] must be a positive integer, not {count!r}")
        out[str(int(layer))] = count
    return out


def format_ranges(layers: Iterable[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    layers = sorted(int(layer) for layer in layers)
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts) or "none"


_DEFAULTS: dict[type, object] = {}  # a default config object per family, for `setting`


def _import(module: str, name: str):
    return getattr(importlib.import_module(module), name)
