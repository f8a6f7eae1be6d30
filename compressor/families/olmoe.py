"""OLMoE (``olmoe``), run by transformers: every layer MoE, ``num_experts`` experts, logits in the model's dtype,
softmax in fp32, top-k, renormalised when ``norm_topk_prob``."""

from __future__ import annotations

from collections.abc import Mapping

from compressor.families.base import FamilyAdapter, RouterSpec


class OlmoeFamily(FamilyAdapter):
    name = "olmoe"
    model_types = ("olmoe",)
    expert_count_key = "num_experts"
    vllm_architectures = ("OlmoeForCausalLM",)
    vllm_per_layer_architecture = "OlmoeForCausalLMPerLayer"

    def is_moe_layer(self, config: Mapping, layer: int) -> bool:
        return 0 <= layer < self.num_layers(config)

    def router(self, config: Mapping) -> RouterSpec:
        return RouterSpec(scoring="softmax", top_k=self.top_k(config),
                          renormalize=bool(self.setting(config, "norm_topk_prob")))
