"""Quantized vs unquantized export: weight size, forward tokens/s in transformers, perplexity cost, and (--vllm)
served tokens/s in vLLM.

    python benchmarks/quantize.py [OUT] [--schemes fp8-dynamic,w8a16,w4a16] [--group-size 16] [--vllm]

OUT is an unquantized moe-compress export (default: models/reference pruned to 16 experts top-2, written to a
temporary folder). Each scheme is quantized from OUT with `moe-compress quantize`'s code. Perplexity: held-out text
(Python standard-library modules through OUT's tokenizer). Speed: forward passes of the same batches, every model
warmed up and interleaved with the order alternated (benchmarks/timing.py); every model computes in bf16, the
quantized outputs loaded as transformers loads them (compressed-tensors dequantizes weights; fp8-dynamic also quantizes
activations on the fly), so this measures what transformers users get, not a quantized kernel. --vllm: generated
tokens/s of the bf16 export and the w4a16 output in vLLM (CPU: the only scheme its CPU build serves for MoE).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from timing import compare, ratio_line  # noqa: E402


def held_out(tokenizer, seq_len: int, count: int) -> list[list[int]]:
    import difflib
    import json
    import pathlib

    text = "".join(Path(module.__file__).read_text() for module in (textwrap, difflib, json.decoder, pathlib))
    ids = tokenizer(text)["input_ids"]
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(min(count, len(ids) // seq_len))]


def default_export(root: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from test_serving import KEEP16, REFERENCE, export, hand_plan

    return export(REFERENCE, root / "pruned", hand_plan(REFERENCE, KEEP16, 2, "renorm"))


@torch.no_grad()
def perplexity(model, sequences: list[list[int]]) -> float:
    from compressor.validation import perplexity as measure

    return measure(model, sequences, batch_size=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, help="unquantized export (default: a pruned reference model)")
    parser.add_argument("--schemes", default="fp8-dynamic,w8a16,w4a16")
    parser.add_argument("--group-size", type=int, default=16, help="int schemes (16 divides the reference's widths)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batches", type=int, default=4, help="timed batches of 4 sequences")
    parser.add_argument("--vllm", action="store_true", help="also serve bf16 and w4a16 in vLLM")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    import compressor  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.quantize import QuantizeOptions, quantize_checkpoint

    with tempfile.TemporaryDirectory(prefix="moe-compress-quantize-bench-") as scratch:
        root = Path(scratch)
        out = args.out or default_export(root)
        paths = {"bf16": out}
        for scheme in args.schemes.split(","):
            paths[scheme] = quantize_checkpoint(out, root / scheme, QuantizeOptions(
                scheme=scheme, group_size=args.group_size, progress=False)).output
        tokenizer = AutoTokenizer.from_pretrained(out)
        sequences = held_out(tokenizer, args.seq_len, 64)
        models = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
                  for name, path in paths.items()}
        sizes = {name: sum(f.stat().st_size for f in path.glob("*.safetensors")) for name, path in paths.items()}
        ppl = {name: perplexity(model, sequences) for name, model in models.items()}
        batches = [torch.tensor(sequences[4 * i:4 * i + 4]) for i in range(args.batches)]
        tokens = sum(b.numel() for b in batches)

        def forward(model):
            def run():
                with torch.no_grad():
                    for batch in batches:
                        model(input_ids=batch, use_cache=False)
            return run

        times = compare({name: forward(model) for name, model in models.items()}, repeats=5)
        print(f"{'model':12} {'weights MiB':>12} {'size':>6} {'ppl':>9} {'ppl cost':>9} {'tokens/s best':>14} "
              f"{'median':>8}   ({len(sequences)} x {args.seq_len} held-out tokens; {tokens} timed tokens x 5, "
              f"interleaved, {torch.get_num_threads()} threads)")
        for name in paths:
            print(f"{name:12} {sizes[name] / 2**20:12.2f} {sizes[name] / sizes['bf16']:6.2f} {ppl[name]:9.3f} "
                  f"{100 * (ppl[name] / ppl['bf16'] - 1):+8.2f}% {tokens / times[name].best:14.0f} "
                  f"{tokens / times[name].median:8.0f}")
        for name in paths:
            if name != "bf16":
                print(ratio_line(f"{name} speed vs bf16", times["bf16"], times[name]))
        if args.vllm and "w4a16" in paths:
            serve(paths["bf16"], paths["w4a16"], sequences)


def serve(bf16: Path, w4a16: Path, sequences: list[list[int]]) -> None:
    """Generated tokens/s in vLLM, bf16 then w4a16 in one process (vLLM holds one model at a time)."""
    from compressor.serving import find_vllm_python, run_vllm

    request = {"models": [{"path": str(bf16), "label": "bf16"}, {"path": str(w4a16), "label": "w4a16"}],
               "dtype": "bfloat16", "max_model_len": 512,
               "throughput": {"prompts": sequences[:8], "max_tokens": 64, "repeats": 3}}
    result = run_vllm(find_vllm_python(None), request, timeout=1800)
    rates = {entry["label"]: entry["throughput"] for entry in result["models"]}
    for label, rate in rates.items():
        print(f"vLLM {result['versions']['vllm']} ({result.get('platform')}) {label}: "
              f"{rate['generated_tokens_per_s']:.0f} generated tokens/s, {rate['prompt_tokens_per_s']:.0f} prompt "
              "tokens/s (best of 3)")
    for key in ("generated_tokens_per_s", "prompt_tokens_per_s"):
        print(f"vLLM w4a16 / bf16 {key}: {rates['w4a16'][key] / rates['bf16'][key]:.2f}x")


if __name__ == "__main__":
    main()
