"""gpt-oss (model_type ``gpt_oss``: gpt-oss-20b, gpt-oss-120b in bf16), run by transformers' ``GptOssForCausalLM``.

Every layer MoE (``mlp``: ``router`` + ``experts``), ``num_local_experts`` experts. Router: logits in the model's
dtype with a logit bias, top-k on the logits, softmax over the chosen. Experts stored fused on disk and in memory,
input-major (``gate_up_proj`` [E, H, 2I] with gate and up interleaved, ``down_proj`` [E, I, H]) with biases, and a
clamped SwiGLU (the experts module's own ``_apply_gate``); the block returns (hidden states, router scores).
OpenAI's MXFP4 checkpoints store the fused experts as ``*_blocks`` / ``*_scales`` (`families.quantization`).
"""

from __future__ import annotations

from collections.abc import Mapping

from compressor.errors import UserError
from compressor.families.base import FamilyAdapter, RouterSpec


class GptOssFamily(FamilyAdapter):
    name = "gpt_oss"
    model_types = ("gpt_oss",)
    expert_count_key = "num_local_experts"
    router_attr = "router"
    experts_layout = {"is_transposed": True, "is_concatenated": False, "has_bias": True, "has_gate": True}
    block_returns_tuple = True
    mxfp4_quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [  # as OpenAI publishes it
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    vllm_architectures = ("GptOssForCausalLM",)
    vllm_per_layer_architecture = "GptOssForCausalLMPerLayer"

    def is_moe_layer(self, config: Mapping, layer: int) -> bool:
        return 0 <= layer < self.num_layers(config)

    def router(self, config: Mapping) -> RouterSpec:
        return RouterSpec(scoring="softmax", top_k=self.top_k(config), renormalize=False, softmax_after_topk=True)

    def compensation_config(self, config, compensation: str) -> dict:
        if compensation == "renorm":
            raise UserError("gpt-oss takes a softmax over the chosen experts, so their weights always sum to 1 and "
                            "'renorm' is what 'none' already does; use none or a fitted mode")
        return {}
