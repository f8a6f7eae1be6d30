"""Runs vLLM's CPU int4 MoE kernel (CPUExpertsInt4's path: the compressed-tensors w4a16 weights repacked by
prepare_int4_moe_layer_for_cpu, then fused_experts_cpu) on random experts and prints, as JSON, its relative error
against the same experts dequantized in fp32. Executed by vLLM's interpreter (tests/test_quantize.py), not imported.

    VLLM_PYTHON vllm_cpu_int4_moe_probe.py HIDDEN,WIDTH,GROUP ...
"""

import json
import sys

import torch


def quantize(weight: torch.Tensor, group: int):
    """Symmetric int4 round-to-nearest of [experts, out, in]: (packed as compressed-tensors writes it, scales,
    dequantized)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    experts, rows, columns = weight.shape
    grouped = weight.unflatten(-1, (columns // group, group))
    scale = (grouped.abs().amax(-1, keepdim=True) / 7.5).to(torch.bfloat16)
    q = torch.clamp(torch.round(grouped / scale.float()), -8, 7)
    packed = torch.stack([pack_to_int32(q[e].reshape(rows, columns).to(torch.int8), 4) for e in range(experts)])
    return packed, scale.squeeze(-1), (q * scale.float()).reshape(weight.shape)


def relative_error(hidden: int, width: int, group: int, experts: int = 8, tokens: int = 8, top_k: int = 2) -> float:
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import prepare_int4_moe_layer_for_cpu

    torch.manual_seed(0)
    w13, s13, d13 = quantize(torch.randn(experts, 2 * width, hidden) / hidden ** 0.5, group)
    w2, s2, d2 = quantize(torch.randn(experts, hidden, width) / width ** 0.5, group)
    # as vLLM's _process_weights_cpu: compressed-tensors' N-first layout to K-first, synthetic zero points
    blocked = prepare_int4_moe_layer_for_cpu(*(t.transpose(1, 2).contiguous() for t in (w13, w2, s13, s2)))
    x = torch.randn(tokens, hidden).to(torch.bfloat16)
    weights, ids = torch.topk(torch.randn(tokens, experts).softmax(-1), top_k)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros(tokens, hidden, dtype=torch.bfloat16)
    ops.fused_experts_cpu(out, x, blocked[0], blocked[1], weights, ids.to(torch.int32), ops.CPUQuantMethod.INT4_W4A8,
                          blocked[2], blocked[3], blocked[4], blocked[5], None, None, None, None, None, True)
    expected = torch.zeros(tokens, hidden)
    for token in range(tokens):
        for slot in range(top_k):
            expert = int(ids[token, slot])
            gate, up = (d13[expert] @ x[token].float()).split(width)
            expected[token] += weights[token, slot] * (d2[expert] @ (torch.nn.functional.silu(gate) * up))
    return float((out.float() - expected).norm() / expected.norm())


if __name__ == "__main__":
    torch.set_num_threads(1)
    if not torch.cpu._is_amx_tile_supported():  # CPUExpertsInt4 runs on AMX CPUs only
        print(json.dumps({"amx": False}))
        sys.exit(0)
    errors = {spec: relative_error(*map(int, spec.split(","))) for spec in sys.argv[1:]}
    print(json.dumps({"amx": True, "errors": errors}))
