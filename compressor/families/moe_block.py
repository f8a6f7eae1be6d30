"""The MoE-block interface every stage uses: routing, each expert's output, the shared output, and views of each
routed expert's weights — for the MoE block of any supported family, on transformers 5's fused expert tensors.

`MoEBlock(family, config, layer, decoder_layer)` wraps the block of one live decoder layer. Routing follows the
family's `RouterSpec` (with an optional mask of removed experts and a top-k override); expert outputs come from
the block's own experts module (transformers' kernels: ``eager``, ``batched_mm``, ``grouped_mm``) and its own
gating function (`_apply_gate`: SwiGLU, gpt-oss's clamped variant, ...); weight views honour the experts'
``is_transposed`` / ``is_concatenated`` / ``has_bias`` layout and copy nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Routing:
    """Per token: fp32 router logits and scores [T, E]; the chosen experts and their weights [T, k] (slot 0 =
    the highest weight), the weights exactly as the block applies them (renormalised, scaled)."""

    logits: torch.Tensor
    scores: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor


@dataclass
class ExpertWeights:
    """Views (no copies) of one routed expert's weights in nn.Linear orientation: gate/up [I, H], down [H, I],
    and their biases (None where the family has none). Writing into a view writes into the fused tensor."""

    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def route(spec, weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None,
          correction: torch.Tensor | None = None, removed: torch.Tensor | None = None,
          top_k: int | None = None) -> Routing:
    """Route tokens `x` [T, H] by `spec` (a RouterSpec) with router `weight` [E, H], logit `bias` [E] and the
    selection-only `correction` bias [E]; experts where `removed` [E] is True can never be chosen (as if their
    logits were -inf); `top_k` overrides the spec's."""
    k = int(top_k or spec.top_k)
    if spec.logits_fp32:
        logits = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    else:
        logits = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype)).float()
    if removed is not None:
        logits = logits.masked_fill(removed.to(logits.device), float("-inf"))
    if spec.softmax_after_topk:
        top, indices = torch.topk(logits, k, dim=-1)
        weights = top.softmax(dim=-1)
        scores = logits.softmax(dim=-1)
    else:
        scores = logits.softmax(dim=-1) if spec.scoring == "softmax" else logits.sigmoid()
        choice = scores if correction is None else scores + correction.float().to(scores.device)
        if removed is not None:
            choice = choice.masked_fill(removed.to(choice.device), float("-inf"))
        if spec.grouped:
            choice = _limit_to_groups(spec, choice)
        _, indices = torch.topk(choice, k, dim=-1)
        weights = scores.gather(-1, indices)
        if spec.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + spec.renorm_eps)
    weights = weights * spec.routed_scaling_factor
    weights, order = weights.sort(dim=-1, descending=True, stable=True)
    return Routing(logits, scores, indices.gather(-1, order), weights)


def _limit_to_groups(spec, choice: torch.Tensor) -> torch.Tensor:
    """Scores outside the `topk_group` best of `n_group` contiguous expert groups set to 0 (``group_limited_greedy``)
    or -inf (``noaux_tc``, whose biased scores may be negative), as transformers does."""
    tokens, experts = choice.shape
    grouped = choice.view(tokens, spec.n_group, experts // spec.n_group)
    if spec.topk_method == "noaux_tc":
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    best = torch.topk(group_scores, spec.topk_group, dim=-1).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    fill = float("-inf") if spec.topk_method == "noaux_tc" else 0.0
    return choice.masked_fill(~mask.repeat_interleave(experts // spec.n_group, dim=1), fill)


class MoEBlock:
    """The MoE block of one decoder layer of a live model, through its family adapter."""

    def __init__(self, family, config: Mapping, layer: int, decoder_layer: torch.nn.Module):
        self.family, self.layer = family, int(layer)
        self.module = getattr(decoder_layer, family.block_attr)
        self.router = getattr(self.module, family.router_attr)
        self.experts = getattr(self.module, family.experts_attr)
        self.shared = [getattr(self.module, name) for name in family.shared_attrs
                       if getattr(self.module, name, None) is not None]
        self.shared_gate = getattr(self.module, family.shared_gate_attr) if family.shared_gate_attr else None
        self.spec = family.router(config)
        self.num_experts = int(self.router.weight.shape[0])

    def _layout(self, flag: str, default: bool) -> bool:
        """The experts' layout flag: the family's declaration, else the experts module's own attribute."""
        return self.family.experts_layout.get(flag, getattr(self.experts, flag, default))

    # -- routing ----------------------------------------------------------------------------------------

    def route(self, x: torch.Tensor, removed: torch.Tensor | None = None, top_k: int | None = None) -> Routing:
        """Routing of tokens `x` [T, H] by the family's rules (see `route`)."""
        weight, bias, correction = self.family.router_tensors(self.module)
        return route(self.spec, weight, x, bias, correction, removed, top_k)

    # -- outputs ------------------------------------------------------------------------------------------

    def expert_outputs(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Unweighted output of every chosen expert [T, k, H], through the block's own experts module."""
        tokens, k = indices.shape
        ones = torch.ones(tokens * k, 1, dtype=x.dtype, device=x.device)
        rows = self.experts(x.repeat_interleave(k, dim=0), indices.reshape(-1, 1), ones)
        return rows.view(tokens, k, -1)

    def routed_output(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The weighted sum of the chosen experts' outputs [T, H], as the block computes it."""
        return self.experts(x, routing.indices, routing.weights.to(_weights_dtype(self.spec, x)))

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """The shared experts' output [T, H] (sigmoid-gated where the family gates it), or None."""
        if not self.shared:
            return None
        out = sum(module(x) for module in self.shared)
        if self.shared_gate is not None:
            out = torch.sigmoid(self.shared_gate(x)) * out
        return out

    def forward(self, x: torch.Tensor, removed: torch.Tensor | None = None, top_k: int | None = None) -> torch.Tensor:
        """The block's output for tokens `x` [T, H]: routed (+ shared) — equal to the block's own forward when
        nothing is removed and top_k is the config's."""
        out = self.routed_output(x, self.route(x, removed, top_k))
        shared = self.shared_output(x)
        return out if shared is None else out + shared

    def observe(self, callback: Callable) -> Callable[[], None]:
        """Make the block report every forward: `callback(hidden_states, routing, expert_outputs, routed_output,
        shared_output)` with [T, ...] tensors, expert outputs unweighted [T, k, H]. The block's output is the same
        as without the observer. Returns a function that detaches it."""
        module = self.module
        if "forward" in vars(module):
            raise RuntimeError("this MoE block already has an observer attached")

        def forward(hidden_states, *args, **kwargs):
            shape = hidden_states.shape
            flat = hidden_states.reshape(-1, shape[-1])
            routing = self.route(flat)
            outputs = self.expert_outputs(flat, routing.indices)
            routed = (outputs.float() * routing.weights.unsqueeze(-1)).sum(dim=1).to(flat.dtype)
            shared = self.shared_output(flat)
            callback(hidden_states=flat, routing=routing, expert_outputs=outputs, routed_output=routed,
                     shared_output=shared)
            out = (routed if shared is None else routed + shared).view(shape)
            return (out, routing.weights) if self.family.block_returns_tuple else out

        module.forward = forward

        def detach():
            del module.forward

        return detach

    # -- weights ------------------------------------------------------------------------------------------

    def expert_weights(self, expert: int) -> ExpertWeights:
        """Views of routed expert `expert`'s weights (no copy)."""
        ex = self.experts
        transposed = self._layout("is_transposed", False)

        def linear_view(tensor):  # [out, in] whichever way it is stored
            return tensor.T if transposed else tensor

        down = linear_view(ex.down_proj[expert])
        down_bias = ex.down_proj_bias[expert] if self._layout("has_bias", False) else None
        if not self._layout("has_gate", True):
            up_bias = ex.up_proj_bias[expert] if self._layout("has_bias", False) else None
            return ExpertWeights(None, linear_view(ex.up_proj[expert]), down, None, up_bias, down_bias)
        gate_up = linear_view(ex.gate_up_proj[expert])  # [2I, H]
        bias = ex.gate_up_proj_bias[expert] if self._layout("has_bias", False) else None
        if self._layout("is_concatenated", True):
            half = gate_up.shape[0] // 2
            parts = (gate_up[:half], gate_up[half:]), (None, None) if bias is None else (bias[:half], bias[half:])
        else:
            parts = (gate_up[0::2], gate_up[1::2]), (None, None) if bias is None else (bias[0::2], bias[1::2])
        (gate, up), (gate_bias, up_bias) = parts
        return ExpertWeights(gate, up, down, gate_bias, up_bias, down_bias)

    def expert_activation(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """What routed expert `expert` feeds its down projection for tokens `x` [n, H]: [n, I]."""
        ex = self.experts
        transposed = self._layout("is_transposed", False)
        name = "gate_up_proj" if self._layout("has_gate", True) else "up_proj"
        weight = getattr(ex, name)[expert]
        projected = x @ weight if transposed else F.linear(x, weight)
        if self._layout("has_bias", False):
            projected = projected + getattr(ex, f"{name}_bias")[expert]
        return ex._apply_gate(projected) if self._layout("has_gate", True) else ex.act_fn(projected)

    def routed_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.experts.parameters())

    def shared_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in [*self.shared, self.shared_gate] if m is not None for p in m.parameters()]

    def router_parameters(self) -> list[torch.nn.Parameter]:
        """The router's trainable tensors (its weight and logit bias; never a selection-only correction bias)."""
        weight, bias, _ = self.family.router_tensors(self.module)
        return [p for p in (weight, bias) if isinstance(p, torch.nn.Parameter)]


def _weights_dtype(spec, x: torch.Tensor) -> torch.dtype:
    """The dtype the family's router hands its weights to the experts in (fp32 for fp32 routers)."""
    fp32 = spec.logits_fp32 if spec.weights_fp32 is None else spec.weights_fp32
    return torch.float32 if fp32 else x.dtype


def moe_blocks(family, config: Mapping, model: torch.nn.Module) -> dict[int, MoEBlock]:
    """Every MoE block of a whole model, by decoder-layer index."""
    return {layer: MoEBlock(family, config, layer, model.get_submodule(family.decoder_layer_path(layer)))
            for layer in family.moe_layers(config)}
