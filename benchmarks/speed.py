"""Forward throughput of the original vs a compressed model, next to the FLOP ratio (the limit of the speed-up).

    python benchmarks/speed.py [ORIGINAL] [COMPRESSED]     # whole models (default: models/reference, work/demo/model)
    python benchmarks/speed.py --block deepseek-moe-16b     # one MoE block at DeepSeekMoE-16B widths: 64 experts top-6
                                                           # -> 32 experts top-1 (2 shared experts)
    python benchmarks/speed.py --block qwen3-30b-a3b        # one MoE block at Qwen3-30B-A3B widths: 128 top-8 -> 64 top-1

Whole models: fp32 on the same batches of demo evaluation text. Blocks: random weights (speed depends on the
structure only), prefill of 512 tokens and decode of 1 token, fp32 and bf16, for each of transformers' expert kernels
(`experts_implementation`: eager, batched_mm, grouped_mm). Every side is warmed up and the sides interleave with
their order alternated (benchmarks/timing.py). FLOPs count the parameters a token actually uses (read from the
checkpoint layout: attention, the chosen experts, shared experts, router, LM head) plus attention scores.
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

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def active_parameters(config: dict) -> dict[str, int]:
    """Per token: {'layers': weights used in the decoder layers, 'head': LM head} — routed experts counted top-k
    times, the embedding lookup not at all."""
    from math import prod

    from compressor.families import detect_family
    from compressor.families.layout import CheckpointLayout

    family = detect_family(config)
    layout = CheckpointLayout(family, config)
    top_k = family.top_k(config)
    used = 0
    for name, shape in layout.shapes.items():
        layer = layout.layer_of(name)
        if layer is None or len(shape) < 2:
            continue
        role = layout.classify(name)
        if role.kind != "expert":
            used += prod(shape)
        elif role.expert is not None:  # one expert's tensor: counted for the top-k chosen of the layer's experts
            used += prod(shape) * top_k / layout.layers[layer].num_experts
        else:  # fused on disk: [E, ...]
            used += prod(shape) * top_k / shape[0]
    return {"layers": int(used), "head": prod(layout.shapes.get(f"{family.lm_head_path}.weight",
                                                                 layout.shapes[family.embedding_path + ".weight"]))}


def forward_flops_per_token(config: dict, seq_len: int) -> float:
    """Multiply-adds x 2 of one token's forward pass: every weight it uses, plus attention scores and values
    (average context seq_len / 2)."""
    active = active_parameters(config)
    attention = 2 * 2 * (seq_len / 2) * config["hidden_size"] * config["num_hidden_layers"]
    return 2 * (active["layers"] + active["head"]) + attention


# -- whole models ------------------------------------------------------------------------------------------------


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


def whole_models(args) -> None:
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
    batches = list(torch.tensor(stream[:need]).view(args.batches, args.batch_size, args.seq_len))
    tokens = sum(b.numel() for b in batches)
    times = compare({"original": forward_pass(args.original, batches),
                     "compressed": forward_pass(args.compressed, batches)}, repeats=5)
    configs = [json.loads((p / "config.json").read_text()) for p in (args.original, args.compressed)]
    flop_ratio = forward_flops_per_token(configs[0], args.seq_len) / forward_flops_per_token(configs[1], args.seq_len)
    sizes = [sum(f.stat().st_size for f in p.glob("*.safetensors")) / 2**20 for p in (args.original, args.compressed)]
    print(f"{'model':12} {'weights MiB':>12} {'tokens/s best':>14} {'median':>8}  (warmed up; 5 passes each, "
          "interleaved)")
    for (name, timing), size in zip(times.items(), sizes):
        print(f"{name:12} {size:12.1f} {tokens / timing.best:14.0f} {tokens / timing.median:8.0f}")
    print(ratio_line("speed-up", times["original"], times["compressed"]) + f"; FLOP ratio (the limit) {flop_ratio:.2f}x")


# -- one MoE block ------------------------------------------------------------------------------------------------


def build_block(config: dict, dtype: torch.dtype, implementation: str):
    """The first MoE block of `config` with random weights (std 0.02, routers 0.3), in `dtype`."""
    from compressor.families import detect_family
    from compressor.families.layout import meta_model
    from compressor.families.moe_block import MoEBlock

    family = detect_family(config)
    model = meta_model(family, config)
    layer = family.moe_layers(config)[0]
    decoder_layer = model.get_submodule(family.decoder_layer_path(layer))
    module = getattr(decoder_layer, family.block_attr)
    module.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    router = MoEBlock(family, config, layer, decoder_layer).router
    with torch.no_grad():
        for parameter in module.parameters():
            std = 0.3 if parameter is router.weight else 0.02
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    module.to(dtype).eval()
    model.config._experts_implementation = implementation
    return module


def pruned_config(config: dict, keep: int, top_k: int) -> dict:
    from compressor.families import detect_family

    family = detect_family(config)
    return family.pruned_config(config, {layer: list(range(keep)) for layer in family.moe_layers(config)}, top_k)


def block_costs(config: dict, tokens: int) -> tuple[float, float]:
    """(FLOPs, weights read) of the first MoE block on `tokens` tokens: FLOPs = 2 x the weights each token uses (top-k
    routed experts, shared experts, router); weights read = every expert that can expect a token (all of them once
    tokens x top-k reaches the expert count), the shared experts and the router, once."""
    from math import prod

    from compressor.families import detect_family
    from compressor.families.layout import CheckpointLayout

    family = detect_family(config)
    layout = CheckpointLayout(family, config)
    layer = layout.layers[family.moe_layers(config)[0]]
    expert = sum(prod(layout.shapes[t.name(0)]) for t in layer.experts)
    shared = sum(prod(layout.shapes[name]) for name in layer.shared)
    router = sum(prod(layout.shapes[name]) for name in layer.router)
    top_k = family.top_k(config)
    touched = min(layer.num_experts, tokens * top_k)
    return tokens * 2 * (top_k * expert + shared + router), touched * expert + shared + router


def blocks(name: str, repeats: int) -> None:
    from synthetic import CONFIGS

    config = CONFIGS[name](2)
    experts = next(iter({v for k, v in config.items() if k in ("n_routed_experts", "num_experts")}))
    small = pruned_config(config, experts // 2, 1)
    top_k = config["num_experts_per_tok"]
    ratios = {}
    for tokens in (512, 1):
        (flops_a, bytes_a), (flops_b, bytes_b) = block_costs(config, tokens), block_costs(small, tokens)
        ratios[tokens] = flops_a / flops_b, bytes_a / bytes_b
        print(f"{tokens} token(s): FLOP ratio {ratios[tokens][0]:.2f}x, weights-read ratio {ratios[tokens][1]:.2f}x")
    print(f"## one MoE block, {name}: {experts} experts top-{top_k} -> {experts // 2} top-1; {repeats} interleaved "
          "runs after warm-up, order alternated; a compute-bound block approaches the FLOP ratio, a memory-bound one "
          "the weights-read ratio")
    print(f"{'dtype':9} {'kernel':11} {'tokens':>6} {'original ms':>12} {'compressed ms':>14} {'speed-up':>9} "
          f"{'of FLOP ratio':>14} {'of weights ratio':>17}")
    for dtype in (torch.float32, torch.bfloat16):
        for implementation in IMPLEMENTATIONS:
            original, compressed = (build_block(c, dtype, implementation) for c in (config, small))
            for tokens in (512, 1):
                gathered = tokens * top_k * sum(p.numel() * p.element_size() for p in original.experts.parameters()) \
                    / experts
                if implementation == "batched_mm" and gathered > 2**31:  # it copies the weights once per token
                    print(f"{str(dtype).removeprefix('torch.'):9} {implementation:11} {tokens:6d} "
                          f"{'(would copy ' + format(gathered / 2**30, '.0f') + ' GiB of weights)':>36}")
                    continue
                x = torch.randn(1, tokens, config["hidden_size"], generator=torch.Generator().manual_seed(1)).to(dtype)

                def run(block=None):
                    with torch.no_grad():
                        block(x)

                times = compare({"original": lambda: run(original), "compressed": lambda: run(compressed)},
                                repeats=repeats)
                speed = times["original"].median / times["compressed"].median
                print(f"{str(dtype).removeprefix('torch.'):9} {implementation:11} {tokens:6d} "
                      f"{1e3 * times['original'].median:12.2f} {1e3 * times['compressed'].median:14.2f} "
                      f"{speed:8.2f}x {speed / ratios[tokens][0]:13.2f}x {speed / ratios[tokens][1]:16.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("original", type=Path, nargs="?", default=REPO / "models" / "reference")
    parser.add_argument("compressed", type=Path, nargs="?", default=REPO / "work" / "demo" / "model")
    parser.add_argument("--block", choices=("deepseek-moe-16b", "qwen3-30b-a3b"), default=None,
                        help="time one MoE block at these widths instead of whole models")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.block:
        blocks(args.block, args.repeats)
    else:
        whole_models(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
