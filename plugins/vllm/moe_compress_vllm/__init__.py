"""vLLM plugin from moe-compress: per-layer expert counts (``n_routed_experts_per_layer`` in config.json), and
MiniMax-M2 / ERNIE-4.5 routing on vLLM's CPU build.

vLLM's MoE model classes build every MoE layer with the one expert count of the config. moe-compress's non-uniform
exports keep a different number of experts per layer and name a per-layer architecture in config.json (e.g.
``Qwen3MoeForCausalLMPerLayer``); `register` (the ``vllm.general_plugins`` entry point, run by vLLM in each of its
processes) registers those architectures as variants of vLLM's own classes (`moe_compress_vllm.models`). Uniform
checkpoints keep their own architecture and need this plugin only on vLLM's CPU build, for the families in
`CPU_ROUTING`.

vLLM's CPU MoE router (``fused_moe/router/cpu_router.py``, ``CPURouter._compute_routing``) runs ungrouped routing as
a plain softmax top-k: it asserts ``scoring_func == "softmax"`` (MiniMax-M2's sigmoid router fails) and leaves out the
selection-only ``e_score_correction_bias`` (ERNIE-4.5 picks other experts than transformers). Its grouped router
(``_grouped_topk``) takes sigmoid or softmax scores with the bias; with one group, all of it open, that is the plain
top-k of score + bias, weights the chosen unbiased scores. On the CPU platform `register` registers the vLLM classes
of `CPU_ROUTING` (and the per-layer variants of those families) as variants that build their fused-MoE layers so.

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
    "MiniMaxM2ForCausalLMPerLayer": ("vllm.model_executor.models.minimax_m2", "MiniMaxM2ForCausalLM",
                                     "num_local_experts"),
    "Ernie4_5_MoeForCausalLMPerLayer": ("vllm.model_executor.models.ernie45_moe", "Ernie4_5_MoeForCausalLM",
                                        "moe_num_experts"),
}
# vLLM class -> its model module, for the classes whose ungrouped sigmoid or biased routing vLLM's CPU router gets wrong
CPU_ROUTING = {
    "MiniMaxM2ForCausalLM": "vllm.model_executor.models.minimax_m2",
    "Ernie4_5_MoeForCausalLM": "vllm.model_executor.models.ernie45_moe",
}
CPU_SUFFIX = "CpuRouting"  # the name of the CPU variant of a CPU_ROUTING class: the class's name and this


def register() -> None:
    """Register every per-layer architecture with vLLM's model registry (lazily: a class is built when used), and on
    the CPU platform the CPU_ROUTING classes' variants in their place."""
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    for architecture in ARCHITECTURES:
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, f"moe_compress_vllm.models:{architecture}")
    if current_platform.is_cpu():
        for architecture in CPU_ROUTING:
            ModelRegistry.register_model(architecture, f"moe_compress_vllm.models:{architecture}{CPU_SUFFIX}")
