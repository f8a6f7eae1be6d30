"""Generate random checkpoints with real models' widths and on-disk layout (a few layers), for benchmarks.

    python benchmarks/synthetic.py OUT_DIR --model deepseek-moe-16b --layers 3 [--max-shard-bytes N]
    python benchmarks/synthetic.py OUT_DIR --model qwen3-30b-a3b --layers 3

Streams tensors to disk (never holds the model in memory). The tensor names and shapes are what transformers'
`save_pretrained` would write for the config (moe-compress's checkpoint layout), layer by layer; configs:
DeepSeekMoE-16B's (the public config.json, kept in tests/fixtures) and Qwen3-30B-A3B's (its public widths:
hidden 2048, 48 layers, 128 experts of width 768, top-8, 32 query / 4 KV heads of 128, vocab 151,936).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from compressor.families import detect_family
from compressor.families.layout import CheckpointLayout
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


def sixteen_b_config(layers: int) -> dict:
    config = json.loads((FIXTURES / "deepseek-moe-16b-base.config.json").read_text())
    config["num_hidden_layers"] = layers
    return config


def qwen3_30b_config(layers: int) -> dict:
    return {**QWEN3_30B_A3B, "num_hidden_layers": layers, "max_window_layers": layers}


CONFIGS = {"deepseek-moe-16b": sixteen_b_config, "qwen3-30b-a3b": qwen3_30b_config}


def tensor_specs(config: dict, dtype=torch.bfloat16) -> list[TensorSpec]:
    """Every tensor of the checkpoint as saved, in storage order: embeddings, layer by layer, then the rest."""
    family = detect_family(config)
    layout = CheckpointLayout(family, config)
    embedding = family.embedding_path + "."

    def order(name: str):
        layer = layout.layer_of(name)
        return (0 if name.startswith(embedding) else 1 if layer is not None else 2, layer or 0, name)

    return [TensorSpec(name, dtype, layout.shapes[name]) for name in sorted(layout.expected, key=order)]


def write_checkpoint(out: Path, config: dict, max_shard_bytes: int = 2**30, seed: int = 0) -> Path:
    """Random weights (std 0.02; norms 1; routers std 0.3 so routing is not uniform), streamed to `out`."""
    family = detect_family(config)
    routers = {name for layer in CheckpointLayout(family, config).layers.values() for name in layer.router}
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    specs = tensor_specs(config)
    writer = ShardedWriter.planned(out, specs, max_shard_bytes)
    for spec in specs:
        if spec.name.endswith("norm.weight"):
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
