"""DeepSeek-V3 / R1 / V3.1 and Moonlight (model_type ``deepseek_v3``), run by transformers' ``DeepseekV3ForCausalLM``.

transformers' router: fp32 logits, sigmoid scores; a selection-only ``e_score_correction_bias`` (a buffer of the
router, sliced with it) is added to choose experts: ``n_group`` contiguous groups scored by the sum of their two
best biased scores, the best ``topk_group`` open (``noaux_tc``), top-k among them; the unbiased scores of the chosen
are renormalised when ``norm_topk_prob`` (+1e-20) and multiplied by ``routed_scaling_factor``. Every layer from
``first_k_dense_replace`` on is MoE, with one shared-experts MLP. ``topk_method`` / ``scoring_func`` of config.json
are not read by transformers (it always routes this way).
"""

from __future__ import annotations

from collections.abc import Mapping

from compressor.errors import UserError
from compressor.families.base import FamilyAdapter, RouterSpec
from compressor.families.deepseek_v2 import DeepseekV2Family


class DeepseekV3Family(FamilyAdapter):
    name = "deepseek_v3"
    model_types = ("deepseek_v3",)
    expert_count_key = "n_routed_experts"
    shared_attrs = ("shared_experts",)
    vllm_architectures = ("DeepseekV3ForCausalLM",)
    vllm_per_layer_architecture = "DeepseekV3ForCausalLMPerLayer"
    # vLLM runs DeepSeek-V3 with DeepSeek-V2's MLA attention: the same CPU-build settings apply
    vllm_cpu_workaround = DeepseekV2Family.vllm_cpu_workaround
    vllm_cpu_engine_args = DeepseekV2Family.vllm_cpu_engine_args
    # vLLM takes the scoring function (default softmax) and the selection bias (noaux_tc only) from config.json
    vllm_routing_keys = {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}

    def _int(self, config: Mapping, key: str) -> int:
        value, minimum = self.setting(config, key), 0 if key == "first_k_dense_replace" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UserError(f"config.json ({self.name}): {key} must be an integer of at least {minimum}, not {value!r}")
        return value

    def is_moe_layer(self, config: Mapping, layer: int) -> bool:
        return 0 <= layer < self.num_layers(config) and layer >= self._int(config, "first_k_dense_replace")

    def router(self, config: Mapping) -> RouterSpec:
        n_group, topk_group = self._int(config, "n_group"), self._int(config, "topk_group")
        if topk_group > n_group:
            raise UserError(f"config.json ({self.name}): topk_group={topk_group} exceeds n_group={n_group}")
        return RouterSpec(scoring="sigmoid", top_k=self.top_k(config),
                          renormalize=bool(self.setting(config, "norm_topk_prob")), topk_method="noaux_tc",
                          n_group=n_group, topk_group=topk_group,
                          routed_scaling_factor=float(self.setting(config, "routed_scaling_factor")),
                          correction_bias=True, logits_fp32=True, renorm_eps=1e-20)

    def ungrouped(self, config: Mapping) -> dict:
        return self.regrouped(config, 1, 1)

    def regrouped(self, config: Mapping, groups: int, chosen: int) -> dict:
        return {**config, "n_group": groups, "topk_group": chosen}
