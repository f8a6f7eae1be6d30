"""DeepSeekMoE (``deepseek-ai/deepseek-moe-16b-*``, model_type ``deepseek``), run by moe-compress's modeling code."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

from compressor.errors import UserError
from compressor.families.base import FamilyAdapter, RouterSpec

PER_LAYER_KEY = "n_routed_experts_per_layer"


class DeepseekMoEFamily(FamilyAdapter):
    """DeepSeekMoE: softmax router over all routed experts, greedy top-k, optional renormalisation.

    MoE layers: ``layer >= first_k_dense_replace and layer % moe_layer_freq == 0`` (upstream's rule).
    Per-layer expert counts: moe-compress's optional ``n_routed_experts_per_layer`` (``{"<layer>": count}``
    or a list with ``null`` for dense layers); absent layers use ``n_routed_experts``.
    In memory the parameter names equal the on-disk names.
    """

    name = "deepseek_moe"
    model_types = ("deepseek",)

    def is_moe_layer(self, config: Mapping, layer: int) -> bool:
        return (
            config.get("n_routed_experts") is not None
            and layer >= int(config.get("first_k_dense_replace") or 0)
            and layer % int(config.get("moe_layer_freq") or 1) == 0
        )

    def num_experts(self, config: Mapping, layer: int) -> int:
        if not 0 <= layer < self.num_layers(config) or not self.is_moe_layer(config, layer):
            raise UserError(f"layer {layer} is not an MoE layer of this {self.name} model")
        per_layer = _per_layer_counts(config.get(PER_LAYER_KEY))
        return int(per_layer.get(str(int(layer)), config["n_routed_experts"]))

    def router(self, config: Mapping) -> RouterSpec:
        return RouterSpec(
            scoring=config.get("scoring_func") or "softmax",
            top_k=self.top_k(config),
            renormalize=bool(config.get("norm_topk_prob", False)),
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            has_bias=False,
        )

    def pruned_config(self, config, kept, top_k, *, ungroup: bool = False) -> dict:
        plan = self.check_kept(config, kept, top_k)
        counts = {layer: len(experts) for layer, experts in plan.items()}
        new = copy.deepcopy(dict(config))
        new.pop(PER_LAYER_KEY, None)
        if counts:
            largest = max(counts.values())
            new[self.expert_count_key] = largest
            differing = {str(layer): count for layer, count in sorted(counts.items()) if count != largest}
            if differing:
                new[PER_LAYER_KEY] = differing
        new[self.top_k_key] = int(top_k)
        return new

    def native_transformers_support(self, config, kept, top_k, *, ungroup: bool = False) -> str | None:
        return "transformers has no native deepseek (v1) model; the output ships moe-compress's modeling file"

    def write_runtime_files(self, directory, config: Mapping) -> None:
        from compressor.modeling import write_modeling_files

        write_modeling_files(directory)

    def model_class(self, config: Mapping) -> type:
        from compressor.modeling import DeepseekForCausalLM

        return DeepseekForCausalLM

    def config_class(self, config: Mapping) -> type:
        from compressor.modeling import DeepseekConfig

        return DeepseekConfig

    def layer_state_dict(self, config, layer, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._strip_layer_prefix(layer, tensors)

    def attach_routing_observer(self, decoder_layer, callback):
        block = decoder_layer.mlp
        if getattr(block, "observer", False) is not None:
            raise RuntimeError("this MoE block already has an observer attached")
        block.observer = callback

        def detach():
            block.observer = None

        return detach

    def split_decoder_layer(self, model, decoder_layer, hidden_states, attention_mask):
        """(residual after attention, MoE block input, MoE block) of one decoder layer on `hidden_states`."""
        from compressor.modeling.modeling_deepseek import _attention_mask

        batch, seq_len, _ = hidden_states.shape
        positions = torch.arange(seq_len, device=hidden_states.device)[None].expand(batch, seq_len)
        position_embeddings = model.model.rotary_emb(hidden_states, positions)
        mask = _attention_mask(attention_mask, batch, seq_len, 0, hidden_states.device)
        attention = decoder_layer.self_attn(decoder_layer.input_layernorm(hidden_states), position_embeddings, mask)
        residual = hidden_states + attention
        return residual, decoder_layer.post_attention_layernorm(residual), decoder_layer.mlp

    def run_decoder_layer(self, model, decoder_layer, hidden_states, attention_mask):
        from compressor.modeling.modeling_deepseek import _attention_mask

        batch, seq_len, _ = hidden_states.shape
        positions = torch.arange(seq_len, device=hidden_states.device)[None].expand(batch, seq_len)
        position_embeddings = model.model.rotary_emb(hidden_states, positions)
        mask = _attention_mask(attention_mask, batch, seq_len, 0, hidden_states.device)
        return decoder_layer(hidden_states, position_embeddings, mask, None)

    def layer_disk_tensors(self, config, layer, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefix = self.layer_prefix(layer)
        return {prefix + key: tensor for key, tensor in state.items()}


def _per_layer_counts(counts) -> dict[str, int]:
    if not counts:
        return {}
    if isinstance(counts, (list, tuple)):
        return {str(i): int(c) for i, c in enumerate(counts) if c is not None}
    return {str(int(layer)): int(count) for layer, count in dict(counts).items()}
