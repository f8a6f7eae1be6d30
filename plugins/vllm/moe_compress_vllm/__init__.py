"""vLLM plugin from moe-compress: per-layer expert counts (``n_routed_experts_per_layer`` in config.json).

vLLM's MoE model classes build every MoE layer with the one expert count of the config. moe-compress's non-uniform
exports keep a different number of experts per layer and name a per-layer architecture in config.json (e.g.
``Qwen3MoeForCausalLMPerLayer``); `register` (the ``vllm.general_plugins`` entry point, run by vLLM in each of its
processes) registers those architectures as variants of vLLM's own classes (`moe_compress_vllm.models`). Uniform
checkpoints keep their own architecture and never reach this plugin.

Needs only vLLM: moe-compress is not imported (it is not installed in vLLM's environment).
"""

PER_LAYER_KEY = "n_routed_experts_per_layer"
PLUGIN_NAME = "moe_compress_per_layer"  # the entry point's name, as VLLM_PLUGINS selects it

# per-layer architecture -> (vLLM model module, vLLM class, the config key holding the expert count)
ARCHITECTURES = {
    "DeepseekForCausalLMPerLayer": ("vllm.model_executor.models.deepseek_v2", "DeepseekForCausalLM", "n_routed_experts"),
    "DeepseekV2ForCausalLMPerLayer": ("vllm.model_executor.models.deepseek_v2", "DeepseekV2ForCausalLM",
                                      "n_routed_experts"),
    "DeepseekV3ForCausalLMPerLayer": ("vllm.model_executor.models.deepseek_v2", "DeepseekV3ForCausalLM",
                                      "n_routed_experts"),
    "Glm4MoeForCausalLMPerLayer": ("vllm.model_executor.models.glm4_moe", "Glm4MoeForCausalLM", "n_routed_experts"),
    "GptOssForCausalLMPerLayer": ("vllm.model_executor.models.gpt_oss", "GptOssForCausalLM", "num_local_experts"),
    "Qwen2MoeForCausalLMPerLayer": ("vllm.model_executor.models.qwen2_moe", "Qwen2MoeForCausalLM", "num_experts"),
    "Qwen3MoeForCausalLMPerLayer": ("vllm.model_executor.models.qwen3_moe", "Qwen3MoeForCausalLM", "num_experts"),
    "MixtralForCausalLMPerLayer": ("vllm.model_executor.models.mixtral", "MixtralForCausalLM", "num_local_experts"),
    "OlmoeForCausalLMPerLayer": ("vllm.model_executor.models.olmoe", "OlmoeForCausalLM", "num_experts"),
}


def register() -> None:
    """Register every per-layer architecture with vLLM's model registry (lazily: a class is built when used)."""
    from vllm import ModelRegistry

    for architecture in ARCHITECTURES:
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, f"moe_compress_vllm.models:{architecture}")
