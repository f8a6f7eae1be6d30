"""GLM-4.5 / 4.5-Air / 4.6 / 4.7 (model_type ``glm4_moe``), run by transformers' ``Glm4MoeForCausalLM``.

Its MoE block is DeepSeek-V3's (`deepseek_v3`): sigmoid router with a selection-only ``e_score_correction_bias``,
``n_group`` / ``topk_group`` (1 / 1 in the published configs), ``norm_topk_prob``, ``routed_scaling_factor``, a
shared-experts MLP, dense layers before ``first_k_dense_replace``; only attention differs (GQA, partial rotary,
optional QK norm), which pruning leaves alone.
"""

from __future__ import annotations

from compressor.families.deepseek_v3 import DeepseekV3Family


class Glm4MoeFamily(DeepseekV3Family):
    name = "glm4_moe"
    model_types = ("glm4_moe",)
    vllm_architectures = ("Glm4MoeForCausalLM",)
    vllm_per_layer_architecture = "Glm4MoeForCausalLMPerLayer"
    vllm_cpu_workaround = None
    vllm_cpu_engine_args = {}
    vllm_routing_keys = {}  # vLLM's GLM-4.5 routes by sigmoid with the selection bias whatever config.json says
