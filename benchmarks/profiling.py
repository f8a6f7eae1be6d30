"""Profiling overhead and memory: tokens/s of profiling vs a plain forward, peak RSS whole vs --layerwise.

    python benchmarks/profiling.py                          # reference model + a generated 16B-width checkpoint
    python benchmarks/profiling.py --model qwen3-30b-a3b    # ... + a generated Qwen3-30B-A3B-width checkpoint
    python benchmarks/profiling.py --skip-synthetic         # reference model only

(a) the shipped reference model on demo calibration text; (b) a random checkpoint with a real model's widths
(benchmarks/synthetic.py: DeepSeekMoE-16B's hidden 2048, 64 experts x 1408, 2 shared, vocab 102400; or
Qwen3-30B-A3B's 128 experts x 768, top-8) and 3 layers, on random token ids.
Target: profiling tokens/s >= 0.9 x plain forward on the same model and batches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from synthetic import CONFIGS, write_checkpoint  # noqa: E402
from timing import compare, ratio_line  # noqa: E402


def forward_pass(model, batches, collector=None):
    """One pass of every batch through `model`, with the collector attached for the pass if given."""

    def run():
        if collector is not None:
            collector.attach(model)
        with torch.no_grad():
            for batch in batches:
                if collector is not None:
                    collector.valid = batch.valid()
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        if collector is not None:
            collector.detach()

    return run


def overhead(model_dir: Path, sources: dict, seq_len: int, max_tokens: int, batch_size: int) -> dict:
    from compressor.data.batching import batches, token_sequences
    from compressor.data.sources import load_source
    from compressor.families import detect_family
    from compressor.io import CheckpointReader
    from compressor.profiling.collector import RoutingCollector
    from compressor.runtime import load_tokenizer

    config = CheckpointReader(model_dir).config
    family = detect_family(config)
    tokenizer = load_tokenizer(model_dir)
    all_batches = []
    for spec in sources.values():
        sequences = token_sequences(load_source(spec), tokenizer, seq_len, max_tokens)
        all_batches += list(batches(sequences, batch_size))
    tokens = sum(b.tokens for b in all_batches)
    model = family.model_class(config).from_pretrained(model_dir, dtype=torch.float32).eval()
    times = compare({"plain": forward_pass(model, all_batches),
                     "profiled": forward_pass(model, all_batches, RoutingCollector(family, config))}, repeats=5)
    return {"tokens": tokens, "times": times}


def peak_rss(model_dir: Path, sources: dict, layerwise: bool, seq_len: int, max_tokens: int, batch_size: int) -> dict:
    """Run `profile_model` in a fresh process; its peak RSS (VmHWM: ru_maxrss would include this process's peak,
    which Linux carries over fork and exec) and wall time."""
    code = f"""
import json, re, sys, time
from pathlib import Path
from compressor.profiling.runner import ProfileOptions, profile_model
from compressor.runtime import ForwardOptions
start = time.perf_counter()
profile_model({str(model_dir)!r}, {sources!r}, ProfileOptions(max_tokens={max_tokens}, forward=ForwardOptions(
              seq_len={seq_len}, batch_size={batch_size}, layerwise={layerwise}), progress=False))
peak_kib = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({{"seconds": time.perf_counter() - start, "peak_rss_mib": peak_kib / 1024}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(title: str, model_dir: Path, sources: dict, seq_len: int, max_tokens: int, batch_size: int) -> None:
    print(f"\n## {title}")
    o = overhead(model_dir, sources, seq_len, max_tokens, batch_size)
    plain, profiled = o["times"]["plain"], o["times"]["profiled"]
    print(f"tokens per pass: {o['tokens']} (both sides warmed up, 5 interleaved passes each, order alternated)")
    print(f"plain forward:   {o['tokens'] / plain.best:10.0f} tokens/s best, {o['tokens'] / plain.median:10.0f} median")
    print(f"profiling:       {o['tokens'] / profiled.best:10.0f} tokens/s best, "
          f"{o['tokens'] / profiled.median:10.0f} median")
    print(ratio_line("speed ratio profiling / plain forward (target >= 0.9)", plain, profiled))
    whole = peak_rss(model_dir, sources, False, seq_len, max_tokens, batch_size)
    layerwise = peak_rss(model_dir, sources, True, seq_len, max_tokens, batch_size)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20
    print(f"checkpoint size: {size:.0f} MiB")
    print(f"peak RSS whole model: {whole['peak_rss_mib']:.0f} MiB ({whole['seconds']:.1f} s end to end)")
    print(f"peak RSS --layerwise: {layerwise['peak_rss_mib']:.0f} MiB ({layerwise['seconds']:.1f} s end to end)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), default="deepseek-moe-16b",
                        help="whose widths the generated checkpoint has")
    parser.add_argument("--skip-synthetic", action="store_true", help="the reference model only")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    demo = {name: f"demo:{name}" for name in ("code", "math", "english", "french")}
    report("reference model (models/reference), fp32", REPO / "models" / "reference", demo,
           seq_len=256, max_tokens=8192, batch_size=8)
    if not args.skip_synthetic:
        with tempfile.TemporaryDirectory(prefix="moe-bench-profile-") as tmp:
            config = CONFIGS[args.model](3)
            ckpt = write_checkpoint(Path(tmp) / "ckpt", config)
            ids = Path(tmp) / "ids.jsonl"
            generator = torch.Generator().manual_seed(0)
            vocab = config["vocab_size"]
            with ids.open("w") as f:
                for _ in range(8):
                    row = torch.randint(0, vocab, (256,), generator=generator).tolist()
                    f.write(json.dumps({"input_ids": row}) + "\n")
            report(f"generated checkpoint with {args.model} widths, 3 layers, bf16 on disk, fp32 run",
                   ckpt, {"random": str(ids)}, seq_len=256, max_tokens=2048, batch_size=4)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
