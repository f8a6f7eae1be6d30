"""What each compensation mode achieves on the reference model: perplexity per domain vs the original.

    python benchmarks/compensation.py [--keep 32] [--targets code,math] [--tokens 16384]

Profiles the reference model on the calibration splits, plans a uniform top-1 plan keeping --keep of 64
experts per layer targeted at --targets, exports it with every compensation mode (fitted modes calibrate
on the targets' calibration splits), and evaluates perplexity on the evaluation splits (never seen in
calibration). Prints a markdown table; --json writes the numbers too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("code", "math", "english", "french", "german", "legal")


def evaluation_sequences(tokenizer, domain: str, tokens: int, seq_len: int = 256):
    from compressor.data.batching import token_sequences
    from compressor.data.sources import load_source

    return token_sequences(load_source(f"demo:{domain}@evaluation"), tokenizer, seq_len, tokens)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "reference")
    parser.add_argument("--keep", type=int, default=32)
    parser.add_argument("--targets", default="code,math")
    parser.add_argument("--tokens", type=int, default=16384, help="evaluation tokens per domain")
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--modes", default="none,renorm,scale,refit,distill")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    import compressor  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.export.exporter import ExportOptions, FitOptions, RunOptions, export_checkpoint
    from compressor.planning import PlanOptions, make_plan
    from compressor.profiling.runner import ProfileOptions, profile_model
    from compressor.runtime import ForwardOptions
    from compressor.validation.perplexity import perplexity

    targets = args.targets.split(",")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    evaluation = {d: evaluation_sequences(tokenizer, d, args.tokens) for d in DOMAINS}

    def evaluate(path, **overrides):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **overrides).eval()
        return {d: perplexity(model, seqs) for d, seqs in evaluation.items()}

    rows = {"original (top-6, 64 experts)": evaluate(args.model),
            "all 64 experts, raw top-1": evaluate(args.model, num_experts_per_tok=1)}
    profile = profile_model(str(args.model), {d: f"demo:{d}" for d in DOMAINS},
                            ProfileOptions(max_tokens=32768, forward=ForwardOptions(seq_len=256), progress=False))
    plan = make_plan(profile, PlanOptions(strategy="uniform", keep=args.keep, domains={t: 1.0 for t in targets},
                                          top_k=1, compensation="none"))
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="moe-bench-comp-") as tmp:
        for mode in args.modes.split(","):
            start = time.perf_counter()
            out = Path(tmp) / mode
            export_checkpoint(str(args.model), plan, out, ExportOptions(
                compensation=mode, run=RunOptions(seq_len=256, progress=False),
                fit=FitOptions(calibration={t: f"demo:{t}" for t in targets}, max_tokens=args.calibration_tokens)))
            seconds[mode] = time.perf_counter() - start
            rows[f"{args.keep}/64 experts, top-1, {mode}"] = evaluate(out)

    base = rows["original (top-6, 64 experts)"]
    header = "| model | " + " | ".join(f"{d}{' (target)' if d in targets else ''}" for d in DOMAINS) + " |"
    print(header)
    print("|---|" + "---|" * len(DOMAINS))
    for label, ppl in rows.items():
        cells = [f"{ppl[d]:.2f}" if ppl is base else f"{ppl[d]:.2f} ({100 * (ppl[d] / base[d] - 1):+.1f}%)" for d in DOMAINS]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\nexport wall time per mode (s): " + ", ".join(f"{m} {s:.0f}" for m, s in seconds.items()))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "seconds": seconds, "targets": targets}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
