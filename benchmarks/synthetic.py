"""Generate random checkpoints with real models' widths and on-disk layout (a few layers), for benchmarks.

    python benchmarks/synthetic.py OUT_DIR --model deepseek-moe-16b --layers 3 [--max-shard-bytes N]
    python benchmarks/synthetic.py OUT_DIR --model qwen3-30b-a3b --layers 3
    python benchmarks/synthetic.py OUT_DIR --model deepseek-v3 --layers 2

Streams tensors to disk (never holds the model in memory). The tensor names and shapes are what transformers'
`save_pretrained` would write for the config (moe-compress's checkpoint layout), layer by layer; configs:
DeepSeekMoE-16B's (the public config.json, kept in tests/fixtures) and Qwen3-30B-A3B's (its public widths:
hidden 2048, 48 layers, 128 experts of width 768, top-8, 32 query / 4 KV heads of 128, vocab 151,936) and
DeepSeek-V3's (its public config.json but for the layer count: hidden 7168, 256 experts of width 2048 in 8 groups,
top-8, one shared expert, MLA attention with 128 heads, vocab 129,280; FP8 e4m3 with 128x128 block scales). V3 keeps
its first layer dense (`first_k_dense_replace` 1 instead of 3, so that 2 layers are one dense + one MoE; 0 for
--layers 1). Its FP8 checkpoint is written as DeepSeek publishes it: every decoder-layer linear weight (attention
projections, dense MLP, routed and shared experts) float8_e4m3fn with an fp32 ``weight_scale_inv`` of [ceil(out /
128), ceil(in / 128)] blocks; embeddings, norms, the router (bf16) and its ``e_score_correction_bias`` (fp32) and
lm_head unquantized.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from compressor.families import detect_family
from compressor.families.layout import CheckpointLayout
from compressor.families.quantization import SCALE_SUFFIX, block_size, scale_name
from compressor.io import ShardedWriter, TensorSpec

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "decoder_sparse_step": 1,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}


DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1,
    "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "use_cache": True, "v_head_dim": 128,
    "vocab_size": 129280,
}


def sixteen_b_config(layers: int) -> dict:
    config = json.loads((FIXTURES / "deepseek-moe-16b-base.config.json").read_text())
    config["num_hidden_layers"] = layers
    return config


def qwen3_30b_config(layers: int) -> dict:
    return {**QWEN3_30B_A3B, "num_hidden_layers": layers, "max_window_layers": layers}


def deepseek_v3_config(layers: int) -> dict:
    return {**DEEPSEEK_V3, "num_hidden_layers": layers, "first_k_dense_replace": min(1, layers - 1)}


CONFIGS = {"deepseek-moe-16b": sixteen_b_config, "qwen3-30b-a3b": qwen3_30b_config,
           "deepseek-v3": deepseek_v3_config}
FP8_BLOCK_NAMES = ("proj.weight", "proj_with_mqa.weight")  # the decoder-layer linear weights DeepSeek-V3 quantizes


def fp8_quantized(config: dict, layout: CheckpointLayout, name: str) -> bool:
    """Whether `name` is stored FP8 (with block scales) in a checkpoint of `config`."""
    return (block_size(config) is not None and layout.layer_of(name) is not None
            and name.endswith(FP8_BLOCK_NAMES))


def tensor_specs(config: dict, dtype=torch.bfloat16) -> list[TensorSpec]:
    """Every tensor of the checkpoint as saved, in storage order: embeddings, layer by layer, then the rest."""
    family = detect_family(config)
    layout = CheckpointLayout(family, config)
    embedding = family.embedding_path + "."

    def order(name: str):
        layer = layout.layer_of(name)
        return (0 if name.startswith(embedding) else 1 if layer is not None else 2, layer or 0, name)

    specs = []
    block = block_size(config)
    for name in sorted(layout.expected, key=order):
        shape = layout.shapes[name]
        if fp8_quantized(config, layout, name):
            specs.append(TensorSpec(name, torch.float8_e4m3fn, shape))
            specs.append(TensorSpec(scale_name(name), torch.float32,
                                    (-(-shape[0] // block[0]), -(-shape[1] // block[1]))))
        elif name.endswith("e_score_correction_bias"):
            specs.append(TensorSpec(name, torch.float32, shape))  # fp32 in DeepSeek's checkpoints
        else:
            specs.append(TensorSpec(name, dtype, shape))
    return specs


def random_fp8(shape, rng: np.random.Generator) -> torch.Tensor:
    """Random float8_e4m3fn values of magnitude < 2 (random bytes with the top exponent bit cleared: never NaN),
    fast: no float arithmetic."""
    data = np.frombuffer(bytearray(rng.bytes(math.prod(shape))), dtype=np.uint8)
    np.bitwise_and(data, 0xBF, out=data)
    return torch.from_numpy(data).view(torch.float8_e4m3fn).view(shape)


def write_checkpoint(out: Path, config: dict, max_shard_bytes: int = 2**30, seed: int = 0) -> Path:
    """Random weights (std 0.02; norms 1; routers std 0.3 so routing is not uniform; FP8 weights random bytes times
    a constant block scale, std about 0.02; correction biases 0), streamed to `out`."""
    family = detect_family(config)
    routers = {name for layer in CheckpointLayout(family, config).layers.values() for name in layer.router}
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    specs = tensor_specs(config)
    writer = ShardedWriter.planned(out, specs, max_shard_bytes)
    for spec in specs:
        if spec.dtype == torch.float8_e4m3fn:
            tensor = random_fp8(spec.shape, rng)
        elif spec.name.endswith(SCALE_SUFFIX):
            tensor = torch.full(spec.shape, 0.02 / 0.6)  # random_fp8's values have a std of about 0.6
        elif spec.name.endswith("e_score_correction_bias"):
            tensor = torch.zeros(spec.shape)
        elif spec.name.endswith("norm.weight"):
            tensor = torch.ones(spec.shape, dtype=spec.dtype)
        else:
            std = 0.3 if spec.name in routers else 0.02
            tensor = (torch.randn(spec.shape, generator=generator) * std).to(spec.dtype)
        writer.write(spec.name, tensor)
    writer.close()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", choices=sorted(CONFIGS), default="deepseek-moe-16b")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--max-shard-bytes", type=int, default=2**30)
    args = parser.parse_args(argv)
    path = write_checkpoint(args.out, CONFIGS[args.model](args.layers), args.max_shard_bytes)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"wrote {path} ({size / 2**30:.2f} GiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
