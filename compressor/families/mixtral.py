"""Mixtral (``mixtral``), run by transformers: every layer MoE, ``num_local_experts`` experts, logits in the model's
dtype, softmax in fp32, top-k, always renormalised, the weights handed to the experts in fp32 (on disk
``block_sparse_moe.experts.E.w1/w2/w3``)."""

from __future__ import annotations

from collections.abc import Mapping

from compressor.errors import UserError
from compressor.families.base import FamilyAdapter, RouterSpec


class MixtralFamily(FamilyAdapter):
    name = "mixtral"
    model_types = ("mixtral",)
    expert_count_key = "num_local_experts"
    vllm_architectures = ("MixtralForCausalLM",)
    vllm_per_layer_architecture = "MixtralForCausalLMPerLayer"

    def is_moe_layer(self, config: Mapping, layer: int) -> bool:
        return 0 <= layer < self.num_layers(config)

    def router(self, config: Mapping) -> RouterSpec:
        return RouterSpec(scoring="softmax", top_k=self.top_k(config), renormalize=True, weights_fp32=True)

    def compensation_config(self, config, compensation: str) -> dict:
        if compensation == "renorm":
            raise UserError("Mixtral always renormalises the chosen weights, so 'renorm' is what 'none' already does; "
                            "use none or a fitted mode")
        return {}
