"""Profiling overhead and memory: tokens/s of profiling vs a plain forward, peak RSS whole vs --layerwise.

    python benchmarks/profiling.py                          # reference model + a generated 16B-width checkpoint
    python benchmarks/profiling.py --model qwen3-30b-a3b    # ... + a generated Qwen3-30B-A3B-width checkpoint
    python benchmarks/profiling.py --skip-synthetic         # reference model only
    python benchmarks/profiling.py --model deepseek-v3 --layers 2 --layerwise --skip-reference --device cuda \
        --dtype bfloat16                                    # DeepSeek-V3 widths (FP8 on disk), one layer in memory

(a) the shipped reference model on demo calibration text; (b) a random checkpoint with a real model's widths
(benchmarks/synthetic.py: DeepSeekMoE-16B's hidden 2048, 64 experts x 1408, 2 shared, vocab 102400; or
Qwen3-30B-A3B's 128 experts x 768, top-8) and 3 layers, on random token ids.
Target: profiling tokens/s >= 0.9 x plain forward on the same model and batches.
--layerwise measures the overhead one decoder layer at a time instead (for checkpoints larger than memory, e.g.
DeepSeek-V3's widths, whose one MoE layer is 22.5 GB in bf16): `profile --layerwise` against a plain layer-by-layer
forward of the same batches (`runtime.run_layer_by_layer`, the same driver without the statistics), both loading
each layer from the shards; the whole-model peak RSS is then not measured.
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


def layerwise_overhead(model_dir: Path, sources: dict, seq_len: int, max_tokens: int, batch_size: int, device: str,
                       dtype: str) -> dict:
    """profile --layerwise vs a plain layer-by-layer forward of the same batches, each reading its layers anew."""
    from compressor.data.batching import batches, token_sequences
    from compressor.data.sources import load_source
    from compressor.families import open_checkpoint
    from compressor.profiling.runner import ProfileOptions, profile_model
    from compressor.runtime import (
        CheckpointTensors, ForwardOptions, LayerwiseModel, load_tokenizer, resolve_device, resolve_dtype,
        run_layer_by_layer,
    )

    tokenizer = load_tokenizer(model_dir)
    work = []
    for spec in sources.values():
        work += list(batches(token_sequences(load_source(spec), tokenizer, seq_len, max_tokens), batch_size))
    options = ProfileOptions(max_tokens=max_tokens, forward=ForwardOptions(
        seq_len=seq_len, batch_size=batch_size, dtype=dtype, device=device, layerwise=True), progress=False)

    def plain():
        checkpoint = open_checkpoint(model_dir)
        runner = LayerwiseModel(checkpoint.family, checkpoint.config,
                                CheckpointTensors(checkpoint.reader, checkpoint.layout), resolve_device(device),
                                resolve_dtype(dtype))
        for store in run_layer_by_layer([runner], work, progress=False):
            store.close()
        checkpoint.close()

    times = compare({"plain": plain, "profiled": lambda: profile_model(str(model_dir), sources, options)}, repeats=3)
    return {"tokens": sum(b.tokens for b in work), "times": times}


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


def report(title: str, model_dir: Path, sources: dict, seq_len: int, max_tokens: int, batch_size: int,
           layerwise: bool = False, device: str = "cpu", dtype: str = "float32") -> None:
    print(f"\n## {title}")
    o = layerwise_overhead(model_dir, sources, seq_len, max_tokens, batch_size, device, dtype) if layerwise \
        else overhead(model_dir, sources, seq_len, max_tokens, batch_size)
    plain, profiled = o["times"]["plain"], o["times"]["profiled"]
    what = "layer by layer, each pass reading every layer from the shards" if layerwise else "whole model"
    print(f"tokens per pass: {o['tokens']} ({what}; both sides warmed up, interleaved passes, order alternated)")
    print(f"plain forward:   {o['tokens'] / plain.best:10.0f} tokens/s best, {o['tokens'] / plain.median:10.0f} median")
    print(f"profiling:       {o['tokens'] / profiled.best:10.0f} tokens/s best, "
          f"{o['tokens'] / profiled.median:10.0f} median")
    print(ratio_line("speed ratio profiling / plain forward (target >= 0.9)", plain, profiled))
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20
    print(f"checkpoint size: {size:.0f} MiB")
    if device != "cpu":
        return  # peak RSS is a CPU-memory figure
    if not layerwise:
        whole = peak_rss(model_dir, sources, False, seq_len, max_tokens, batch_size)
        print(f"peak RSS whole model: {whole['peak_rss_mib']:.0f} MiB ({whole['seconds']:.1f} s end to end)")
    rss = peak_rss(model_dir, sources, True, seq_len, max_tokens, batch_size)
    print(f"peak RSS --layerwise: {rss['peak_rss_mib']:.0f} MiB ({rss['seconds']:.1f} s end to end)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), default="deepseek-moe-16b",
                        help="whose widths the generated checkpoint has")
    parser.add_argument("--skip-synthetic", action="store_true", help="the reference model only")
    parser.add_argument("--skip-reference", action="store_true", help="the generated checkpoint only")
    parser.add_argument("--layers", type=int, default=3, help="decoder layers of the generated checkpoint")
    parser.add_argument("--layerwise", action="store_true",
                        help="the generated checkpoint's overhead one layer at a time (no whole-model run)")
    parser.add_argument("--device", default="cpu", help="for the generated checkpoint: cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="for the generated checkpoint: float32 or bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    demo = {name: f"demo:{name}" for name in ("code", "math", "english", "french")}
    if not args.skip_reference:
        report("reference model (models/reference), fp32", REPO / "models" / "reference", demo,
               seq_len=256, max_tokens=8192, batch_size=8)
    if not args.skip_synthetic:
        with tempfile.TemporaryDirectory(prefix="moe-bench-profile-") as tmp:
            config = CONFIGS[args.model](args.layers)
            ckpt = write_checkpoint(Path(tmp) / "ckpt", config)
            ids = Path(tmp) / "ids.jsonl"
            generator = torch.Generator().manual_seed(0)
            vocab = config["vocab_size"]
            with ids.open("w") as f:
                for _ in range(8):
                    row = torch.randint(0, vocab, (256,), generator=generator).tolist()
                    f.write(json.dumps({"input_ids": row}) + "\n")
            stored = "FP8 with block scales" if "quantization_config" in config else "bf16"
            report(f"generated checkpoint with {args.model} widths, {args.layers} layers, {stored} on disk, "
                   f"{args.dtype} run on {args.device}" + (", layer by layer" if args.layerwise else ""),
                   ckpt, {"random": str(ids)}, seq_len=256, max_tokens=2048, batch_size=4, layerwise=args.layerwise,
                   device=args.device, dtype=args.dtype)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
