"""The model-family interface: everything a stage needs to know about a family, so stages never branch on it.

Methods take the plain config dict read from ``config.json`` unless noted. Tensor names are the
on-disk (safetensors) names; the "in-memory" side maps them to a transformers module's state_dict.

The base class implements the DeepSeek-style on-disk layout that the supported families share:
``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`` (routed experts),
``model.layers.N.mlp.gate.weight`` [E, hidden] (+ ``e_score_correction_bias`` [E] for biased routers),
``model.layers.N.mlp.shared_experts.*``; subclasses supply the config semantics and in-memory layout.
"""

from __future__ import annotations

import copy
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from compressor.errors import UserError

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
TENSOR_KINDS = ("expert", "router", "shared_expert", "other")


@dataclass(frozen=True)
class RouterSpec:
    """How a family's router picks and weights experts.

    - scoring: ``softmax`` or ``sigmoid`` over the router logits (fp32).
    - top_k: experts per token.
    - renormalize: whether the chosen weights are renormalised to sum to 1 (``norm_topk_prob``).
    - topk_method: ``greedy`` (plain top-k), ``group_limited_greedy`` (top-k within the `topk_group`
      best of `n_group` contiguous expert groups, group score = best expert), ``noaux_tc`` (V3-style:
      biased scores for selection, group score = sum of the best two).
    - routed_scaling_factor: multiplies the routed weights.
    - has_bias: the router has ``e_score_correction_bias`` [E] (added to scores for selection only).
    """

    scoring: str
    top_k: int
    renormalize: bool
    topk_method: str
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    has_bias: bool

    def __post_init__(self):
        if self.scoring not in SCORING_FUNCS:
            raise UserError(
                f"unsupported router scoring function {self.scoring!r}; supported: {', '.join(SCORING_FUNCS)}"
            )
        if self.topk_method not in TOPK_METHODS:
            raise UserError(
                f"unsupported router topk_method {self.topk_method!r}; supported: {', '.join(TOPK_METHODS)}"
            )

    @property
    def grouped(self) -> bool:
        """Whether expert choice is restricted to groups (so pruning must keep the groups balanced)."""
        return self.topk_method in ("group_limited_greedy", "noaux_tc") and self.n_group > 1


@dataclass(frozen=True)
class TensorRole:
    """What an on-disk tensor is.

    kind: ``expert`` (a routed expert's weight), ``router``, ``shared_expert`` or ``other``.
    layer: decoder layer index, or None for tensors outside the layers (embeddings, final norm, lm_head).
    expert: routed expert index (kind ``expert`` only).
    suffix: the rest of the name after ``mlp.experts.E.`` (expert), ``mlp.gate.`` (router),
    ``mlp.shared_experts.`` (shared_expert), the layer prefix (other, in a layer) or the whole name.
    """

    kind: str
    layer: int | None
    expert: int | None
    suffix: str


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(.+)$")
_ROUTER_RE = re.compile(r"^mlp\.gate\.(weight|e_score_correction_bias)$")
_SHARED_RE = re.compile(r"^mlp\.shared_experts\.(.+)$")


class FamilyAdapter(ABC):
    """One model family (a set of ``model_type`` values sharing on-disk layout and routing semantics)."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    expert_count_key: ClassVar[str] = "n_routed_experts"
    top_k_key: ClassVar[str] = "num_experts_per_tok"
    expert_suffixes: ClassVar[tuple[str, ...]] = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
    shared_expert_suffixes: ClassVar[tuple[str, ...]] = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")

    # -- structure --------------------------------------------------------------------------------

    def num_layers(self, config: Mapping) -> int:
        return int(self._require(config, "num_hidden_layers"))

    @abstractmethod
    def is_moe_layer(self, config: Mapping, layer: int) -> bool:
        """Whether decoder layer `layer` has routed experts."""

    def moe_layers(self, config: Mapping) -> list[int]:
        return [layer for layer in range(self.num_layers(config)) if self.is_moe_layer(config, layer)]

    @abstractmethod
    def num_experts(self, config: Mapping, layer: int) -> int:
        """Routed experts in MoE layer `layer` (UserError for a dense layer)."""

    def top_k(self, config: Mapping) -> int:
        return int(self._require(config, self.top_k_key))

    @abstractmethod
    def router(self, config: Mapping) -> RouterSpec:
        """The routing rule of this config."""

    def num_shared_experts(self, config: Mapping) -> int:
        return int(config.get("n_shared_experts") or 0)

    # -- on-disk tensor names ----------------------------------------------------------------------

    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{int(layer)}."

    def layer_module_name(self, layer: int) -> str:
        """The decoder layer's module path in the model built by `model_class` (for ``get_submodule``)."""
        return f"model.layers.{int(layer)}"

    def expert_tensor_name(self, layer: int, expert: int, suffix: str) -> str:
        """On-disk name of routed expert `expert`'s tensor `suffix` (e.g. ``"down_proj.weight"``) in `layer`."""
        return f"{self.layer_prefix(layer)}mlp.experts.{int(expert)}.{suffix}"

    def expert_tensor_names(self, config: Mapping, layer: int, expert: int) -> list[str]:
        count = self.num_experts(config, layer)
        if not 0 <= expert < count:
            raise UserError(f"layer {layer} has {count} routed experts; there is no expert {expert}")
        return [self.expert_tensor_name(layer, expert, suffix) for suffix in self.expert_suffixes]

    def router_tensor_name(self, layer: int, suffix: str = "weight") -> str:
        return f"{self.layer_prefix(layer)}mlp.gate.{suffix}"

    def router_tensor_names(self, config: Mapping, layer: int) -> list[str]:
        """The router's tensors in `layer`: weight [E, hidden] (+ correction bias [E]); row/entry e = expert e."""
        self.num_experts(config, layer)  # checks that the layer is MoE
        names = [self.router_tensor_name(layer, "weight")]
        if self.router(config).has_bias:
            names.append(self.router_tensor_name(layer, "e_score_correction_bias"))
        return names

    def shared_expert_tensor_names(self, config: Mapping, layer: int) -> list[str]:
        """The shared experts' tensors in MoE layer `layer` (stored as one MLP); empty when there are none."""
        self.num_experts(config, layer)
        if not self.num_shared_experts(config):
            return []
        return [f"{self.layer_prefix(layer)}mlp.shared_experts.{suffix}" for suffix in self.shared_expert_suffixes]

    def non_layer_tensor_names(self, config: Mapping) -> list[str]:
        """Tensors outside the decoder layers: embeddings, final norm, and lm_head unless tied."""
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not config.get("tie_word_embeddings", False):
            names.append("lm_head.weight")
        return names

    def classify(self, name: str) -> TensorRole:
        """What on-disk tensor `name` is (by its name alone)."""
        match = _LAYER_RE.match(name)
        if match is None:
            return TensorRole("other", None, None, name)
        layer, rest = int(match.group(1)), match.group(2)
        if m := _EXPERT_RE.match(rest):
            return TensorRole("expert", layer, int(m.group(1)), m.group(2))
        if m := _ROUTER_RE.match(rest):
            return TensorRole("router", layer, None, m.group(1))
        if m := _SHARED_RE.match(rest):
            return TensorRole("shared_expert", layer, None, m.group(1))
        return TensorRole("other", layer, None, rest)

    def expected_tensor_names(self, config: Mapping) -> set[str]:
        """Names a checkpoint of this config must hold: experts, routers, shared experts, non-layer tensors."""
        names = set(self.non_layer_tensor_names(config))
        for layer in self.moe_layers(config):
            names.update(self.router_tensor_names(config, layer))
            names.update(self.shared_expert_tensor_names(config, layer))
            for expert in range(self.num_experts(config, layer)):
                names.update(self.expert_tensor_names(config, layer, expert))
        return names

    def check_config(self, config: Mapping) -> None:
        """UserError (naming the key) when config.json's values cannot describe a model of this family: wrong
        types, counts below 1, top-k outside 1..experts, or values the config class itself refuses."""
        layers = config_int(config, "num_hidden_layers", minimum=1)
        config_int(config, "hidden_size", minimum=1)
        config_int(config, "vocab_size", minimum=1)
        top_k = config_int(config, self.top_k_key, minimum=1)
        try:
            moe = [layer for layer in range(layers) if self.is_moe_layer(config, layer)]
            counts = {layer: self.num_experts(config, layer) for layer in moe}
        except (TypeError, ValueError) as error:
            raise UserError(f"config.json ({self.name}) has a value of the wrong type: {error}") from None
        for layer, count in counts.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise UserError(f"config.json ({self.name}): layer {layer} would have {count!r} routed experts")
            if top_k > count:
                raise UserError(f"config.json ({self.name}): {self.top_k_key}={top_k} exceeds the {count} routed "
                                f"experts of layer {layer}")
        try:
            self.build_config(config)
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise UserError(f"config.json ({self.name}) is not valid: {' '.join(str(error).split())}") from None

    def validate_checkpoint(self, config: Mapping, reader) -> None:
        """UserError when the checkpoint's config or tensors (`reader`: names and header shapes) do not make a
        model of this family: bad config values, missing or surplus experts, a router whose shape disagrees with
        the expert count, experts of one layer with different shapes."""
        self.check_config(config)
        names = set(reader.names())
        missing = sorted(self.expected_tensor_names(config) - names)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            hint = ""
            if any(self.classify(n).kind == "other" and ".mlp.experts." in n for n in names):
                hint = " (fused expert tensors on disk are not supported; save per-expert tensors)"
            raise UserError(
                f"checkpoint does not match its config.json ({self.name}): missing {', '.join(missing[:3])}{more}{hint}"
            )
        moe = set(self.moe_layers(config))
        hidden = int(config["hidden_size"])
        for name in sorted(names):
            role = self.classify(name)
            if role.kind == "expert" and (role.layer not in moe or role.expert >= self.num_experts(config, role.layer)):
                raise UserError(f"checkpoint holds {name}, which its config.json ({self.name}) has no expert for")
        for layer in sorted(moe):
            count = self.num_experts(config, layer)
            for name in self.router_tensor_names(config, layer):
                shape = tuple(reader.info(name).shape)
                if not shape or shape[0] != count or (name.endswith(".weight") and shape[1:] != (hidden,)):
                    raise UserError(f"{name} has shape {list(shape)}, but config.json ({self.name}) gives layer "
                                    f"{layer} {count} routed experts of hidden size {hidden}")
            for suffix in self.expert_suffixes:
                shapes = {tuple(reader.info(self.expert_tensor_name(layer, e, suffix)).shape) for e in range(count)}
                if len(shapes) > 1:
                    raise UserError(f"layer {layer}: the routed experts' {suffix} tensors differ in shape "
                                    f"({', '.join(str(list(s)) for s in sorted(shapes))})")

    # -- pruning ----------------------------------------------------------------------------------

    @abstractmethod
    def pruned_config(
        self, config: Mapping, kept: Mapping[int, list[int]], top_k: int, *, ungroup: bool = False
    ) -> dict:
        """A new config dict for a checkpoint that keeps, per MoE layer, experts `kept[layer]` (old indices, in
        their new order: new expert i is old expert ``kept[layer][i]``) and routes `top_k` per token.

        `ungroup=True` rewrites a grouped router to plain greedy top-k (families without groups ignore it).
        """

    @abstractmethod
    def native_transformers_support(
        self, config: Mapping, kept: Mapping[int, list[int]], top_k: int, *, ungroup: bool = False
    ) -> str | None:
        """None if plain transformers loads the pruned output without custom code, else the reason."""

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
                raise UserError(
                    f"keep-plan names layer {layer}, which is not an MoE layer (MoE layers: {format_ranges(moe)})"
                )
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
            raise UserError(
                f"top_k={top_k} exceeds the {len(plan[smallest])} experts kept in layer {smallest}"
            )
        return plan

    # -- in memory --------------------------------------------------------------------------------

    @abstractmethod
    def model_class(self, config: Mapping) -> type:
        """The transformers causal-LM class that runs this family."""

    @abstractmethod
    def config_class(self, config: Mapping) -> type:
        """The transformers config class for `model_class`."""

    def build_config(self, config: Mapping):
        """A config object of `config_class` built from the config dict."""
        return self.config_class(config).from_dict(copy.deepcopy(dict(config)))

    @abstractmethod
    def layer_state_dict(
        self, config: Mapping, layer: int, tensors: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map decoder layer `layer`'s on-disk tensors (all of them, by on-disk name) to the state_dict keys of
        the layer module (``model.get_submodule(layer_module_name(layer))``)."""

    @abstractmethod
    def layer_disk_tensors(
        self, config: Mapping, layer: int, state: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Inverse of `layer_state_dict`: a decoder layer's state_dict -> on-disk names and tensors."""

    def attach_routing_observer(self, decoder_layer: torch.nn.Module, callback) -> Callable[[], None]:
        """Call `callback` on every forward of the layer's MoE block with keyword arguments
        hidden_states, scores, topk_idx, topk_weight (slot 0 = highest weight), expert_outputs
        ([tokens, k, hidden], unweighted), routed_output and shared_output; returns a function that detaches it."""
        raise UserError(f"routing statistics are not implemented for the {self.name} family yet")

    embedding_tensor_name: ClassVar[str] = "model.embed_tokens.weight"
    final_norm_module: ClassVar[str] = "model.norm"
    lm_head_module: ClassVar[str] = "lm_head"

    def compensation_config(self, config: Mapping, compensation: str) -> dict:
        """Config keys a compensation mode needs in the output (`renorm`: renormalise the chosen weights)."""
        return {"norm_topk_prob": True} if compensation == "renorm" else {}

    def write_runtime_files(self, directory, config: Mapping) -> None:
        """Files the output needs besides weights and config.json to load (e.g. modeling code)."""

    def split_decoder_layer(self, model, decoder_layer, hidden_states, attention_mask):
        """(residual after attention, MoE block input, MoE block) of an MoE decoder layer, for compensation.
        The MoE block must offer `gate(x) -> (scores, topk_idx, topk_weight, aux)`, `experts[e]` SwiGLU
        modules with gate_proj/up_proj/down_proj, `expert_outputs(x, topk_idx)` and `shared_experts`."""
        raise UserError(f"fitted compensation is not implemented for the {self.name} family yet; use none or renorm")

    def run_decoder_layer(self, model, decoder_layer, hidden_states, attention_mask):
        """Run one decoder layer of `model` (built by `model_class`) on `hidden_states` [batch, seq, hidden]
        with a [batch, seq] padding mask (or None), as the full model's forward would; returns its output."""
        raise UserError(f"layer-by-layer execution is not implemented for the {self.name} family yet")

    def non_layer_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map non-layer on-disk tensors to state_dict keys of the full model (identity for these families)."""
        return dict(tensors)

    # -- helpers ----------------------------------------------------------------------------------

    def _require(self, config: Mapping, key: str):
        value = config.get(key)
        if value is None:
            raise UserError(f"config.json ({self.name}) lacks {key!r}")
        return value

    def _strip_layer_prefix(self, layer: int, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefix = self.layer_prefix(layer)
        out = {}
        for name, tensor in tensors.items():
            if not name.startswith(prefix):
                raise ValueError(f"{name!r} does not belong to decoder layer {layer}")
            out[name[len(prefix):]] = tensor
        return out

    def __repr__(self) -> str:
        return f"<family {self.name} (model_type {', '.join(self.model_types)})>"


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
