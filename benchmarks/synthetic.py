"""Generate a random checkpoint with DeepSeekMoE-16B's real widths and on-disk layout (a few layers).

    python benchmarks/synthetic.py OUT_DIR --layers 3 [--max-shard-size 1GB]

Streams tensors to disk (never holds the model in memory). Uses the real 16B config.json from
../shared/reference when present (only num_hidden_layers changed), else the same values inline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from compressor.families import detect_family
from compressor.io import ShardedWriter, TensorSpec

REFERENCE_CONFIG = Path(__file__).resolve().parents[1].parent / "shared/reference/deepseek-moe-16b-base/config.json"
DEEPSEEK_MOE_16B = {
    "architectures": ["DeepseekForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "max_position_embeddings": 4096,
    "model_type": "deepseek", "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 28, "num_key_value_heads": 16, "pretraining_tp": 1, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 10000, "scoring_func": "softmax", "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 102400,
}


def sixteen_b_config(layers: int) -> dict:
    config = json.loads(REFERENCE_CONFIG.read_text()) if REFERENCE_CONFIG.exists() else dict(DEEPSEEK_MOE_16B)
    config["num_hidden_layers"] = layers
    return config


def tensor_specs(config: dict, dtype=torch.bfloat16) -> list[TensorSpec]:
    """Every tensor of the checkpoint in upstream's order (embeddings, layer by layer, norm, lm_head)."""
    family = detect_family(config)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads_dim = hidden  # plain MHA: q/k/v/o are hidden x hidden
    specs = [TensorSpec("model.embed_tokens.weight", dtype, (vocab, hidden))]
    for layer in range(config["num_hidden_layers"]):
        p = family.layer_prefix(layer)
        specs += [TensorSpec(p + f"self_attn.{n}_proj.weight", dtype, (heads_dim, hidden)) for n in "qkvo"]
        specs += [TensorSpec(p + "input_layernorm.weight", dtype, (hidden,)),
                  TensorSpec(p + "post_attention_layernorm.weight", dtype, (hidden,))]
        if family.is_moe_layer(config, layer):
            width = config["moe_intermediate_size"]
            specs.append(TensorSpec(family.router_tensor_name(layer), dtype, (family.num_experts(config, layer), hidden)))
            for expert in range(family.num_experts(config, layer)):
                specs += _mlp(family.expert_tensor_name(layer, expert, "").rstrip("."), width, hidden, dtype)
            specs += _mlp(p + "mlp.shared_experts", width * config["n_shared_experts"], hidden, dtype)
        else:
            specs += _mlp(p + "mlp", config["intermediate_size"], hidden, dtype)
    specs += [TensorSpec("model.norm.weight", dtype, (hidden,)), TensorSpec("lm_head.weight", dtype, (vocab, hidden))]
    return specs


def _mlp(prefix: str, width: int, hidden: int, dtype) -> list[TensorSpec]:
    return [TensorSpec(f"{prefix}.gate_proj.weight", dtype, (width, hidden)),
            TensorSpec(f"{prefix}.up_proj.weight", dtype, (width, hidden)),
            TensorSpec(f"{prefix}.down_proj.weight", dtype, (hidden, width))]


def write_checkpoint(out: Path, config: dict, max_shard_bytes: int = 2**30, seed: int = 0) -> Path:
    """Random weights (std 0.02; norms 1; router std 0.3 so routing is not uniform), streamed to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    specs = tensor_specs(config)
    writer = ShardedWriter.planned(out, specs, max_shard_bytes)
    for spec in specs:
        if spec.name.endswith("norm.weight"):
            tensor = torch.ones(spec.shape, dtype=spec.dtype)
        else:
            std = 0.3 if spec.name.endswith("mlp.gate.weight") else 0.02
            tensor = (torch.randn(spec.shape, generator=generator) * std).to(spec.dtype)
        writer.write(spec.name, tensor)
    writer.close()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--max-shard-bytes", type=int, default=2**30)
    args = parser.parse_args(argv)
    path = write_checkpoint(args.out, sixteen_b_config(args.layers), args.max_shard_bytes)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"wrote {path} ({size / 2**30:.2f} GiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
