"""DeepSeekMoE (``deepseek-ai/deepseek-moe-16b-*``, model_type ``deepseek``), run by moe-compress's modeling code.

MoE layers: ``layer >= first_k_dense_replace and layer % moe_layer_freq == 0`` (upstream's rule); routing: fp32
softmax over all routed experts, top-k, renormalised when ``norm_topk_prob``; shared experts as one MLP. Our
model class holds per-layer expert counts itself.
"""

from __future__ import annotations

from collections.abc import Mapping

from compressor.errors import UserError
from compressor.families.base import FamilyAdapter, RouterSpec, config_bool, config_int


class DeepseekMoEFamily(FamilyAdapter):
    name = "deepseek_moe"
    model_types = ("deepseek",)
    expert_count_key = "n_routed_experts"
    shared_attrs = ("shared_experts",)
    model_class_path = ("compressor.modeling.modeling_deepseek", "DeepseekForCausalLM")
    config_class_path = ("compressor.modeling.configuration_deepseek", "DeepseekConfig")
    per_layer_counts_native = True
    vllm_architectures = ("DeepseekForCausalLM",)
    vllm_per_layer_architecture = "DeepseekForCausalLMPerLayer"
    vllm_reads_shipped_config = "configuration_deepseek.py"  # vLLM has no DeepSeekMoE config class of its own

    def is_moe_layer(self, config: Mapping, layer: int) -> bool:
        return (config.get(self.expert_count_key) is not None
                and layer >= config_int(config, "first_k_dense_replace", default=0)
                and layer % config_int(config, "moe_layer_freq", default=1, minimum=1) == 0)

    def router(self, config: Mapping) -> RouterSpec:
        scoring = config.get("scoring_func") or "softmax"
        if scoring != "softmax":
            raise UserError(f"DeepSeekMoE scores experts with softmax, not {scoring!r}")
        return RouterSpec(scoring="softmax", top_k=self.top_k(config),
                          renormalize=config_bool(config, "norm_topk_prob", False), logits_fp32=True, renorm_eps=1e-20)

    def native_transformers_support(self, config, kept, top_k, *, ungroup: bool = False) -> str | None:
        return "transformers has no native deepseek (v1) model; the output ships moe-compress's modeling file"

    def write_runtime_files(self, directory, config: Mapping) -> None:
        from compressor.modeling import write_modeling_files

        write_modeling_files(directory)
