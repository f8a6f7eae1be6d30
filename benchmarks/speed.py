"""Forward throughput of the original vs a compressed model on the same data, next to the FLOP ratio.

    python benchmarks/speed.py [ORIGINAL] [COMPRESSED]     # default: models/reference and work/demo/model

Both models run in fp32 on the same batches of demo evaluation text (best of 3 passes, 2 threads).
The FLOP ratio (per-token forward FLOPs, original / compressed) is the limit the speed-up can approach.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from timing import compare, ratio_line  # noqa: E402


def forward_flops_per_token(config: dict, seq_len: int) -> float:
    """Multiply-adds x 2 of one token's forward pass (projections, active experts, attention scores, LM head)."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    per_layer_counts = config.get("n_routed_experts_per_layer") or {}
    flops = 2 * hidden * config["vocab_size"]  # LM head
    for layer in range(layers):
        flops += 2 * 4 * hidden * hidden + 2 * 2 * seq_len * hidden  # q,k,v,o + scores/values (average context ~seq/2 x2)
        moe = (config.get("n_routed_experts") and layer >= config.get("first_k_dense_replace", 0)
               and layer % config.get("moe_layer_freq", 1) == 0)
        if moe:
            width = config["moe_intermediate_size"]
            active = config["num_experts_per_tok"] + (config.get("n_shared_experts") or 0)
            experts = int(per_layer_counts.get(str(layer), config["n_routed_experts"]))
            flops += 2 * 3 * hidden * width * active + 2 * hidden * experts  # experts + router
        else:
            flops += 2 * 3 * hidden * config["intermediate_size"]
    return flops


def forward_pass(path: Path, batches: list[torch.Tensor]):
    """A function running every batch through the model at `path` (fp32, no KV cache)."""
    import compressor  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def run():
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch, use_cache=False)

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("original", type=Path, nargs="?", default=REPO / "models" / "reference")
    parser.add_argument("compressed", type=Path, nargs="?", default=REPO / "work" / "demo" / "model")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    from compressor.data import demo_documents

    tokenizer = AutoTokenizer.from_pretrained(args.original)
    need = args.seq_len * args.batch_size * args.batches
    domains = ("code", "math", "english", "french")
    stream = []
    for domain in domains:
        part = []
        for doc in demo_documents(domain, "evaluation"):
            part += tokenizer(doc)["input_ids"]
            if len(part) >= need // len(domains) + args.seq_len:
                break
        stream += part[: need // len(domains) + args.seq_len]
    ids = torch.tensor(stream[:need]).view(args.batches, args.batch_size, args.seq_len)
    batches = list(ids)
    tokens = sum(b.numel() for b in batches)
    times = compare({"original": forward_pass(args.original, batches),
                     "compressed": forward_pass(args.compressed, batches)}, repeats=5)
    configs = [json.loads((p / "config.json").read_text()) for p in (args.original, args.compressed)]
    flop_ratio = forward_flops_per_token(configs[0], args.seq_len) / forward_flops_per_token(configs[1], args.seq_len)
    sizes = [sum(f.stat().st_size for f in p.glob("*.safetensors")) / 2**20 for p in (args.original, args.compressed)]
    print(f"{'model':12} {'weights MiB':>12} {'tokens/s best':>14} {'median':>8}  (warmed up; 5 passes each, interleaved)")
    for (name, timing), size in zip(times.items(), sizes):
        print(f"{name:12} {size:12.1f} {tokens / timing.best:14.0f} {tokens / timing.median:8.0f}")
    print(ratio_line("speed-up", times["original"], times["compressed"]) + f"; FLOP ratio (the limit) {flop_ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
