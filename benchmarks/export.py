"""Export speed and memory on a checkpoint with DeepSeekMoE-16B's real widths and tensor layout.

    python benchmarks/export.py [--layers 4] [--keep 32]

Generates a random bf16 checkpoint (hidden 2048, 64 experts x 1408, 2 shared, vocab 102400; layer 0 dense,
the rest MoE; several shards), then measures, each in a fresh process, wall time and peak RSS of:
  1. `moe-compress export` (uniform plan keeping --keep experts per layer, top-1, compensation none);
  2. `cp -r` of the exported output (the same bytes: the floor for any rewrite);
  3. transformers: load the model + drop the experts + `save_pretrained` (the naive path).
Targets: export time <= 1.3x cp, export peak RSS < 1 GiB whatever the checkpoint size. cp leaves its bytes in
the page cache while export fsyncs each shard, so `cp -r` + `sync` is measured too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

_MEASURE = """
import resource, subprocess, sys, time
start = time.perf_counter()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
seconds = time.perf_counter() - start
print(seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""

_NAIVE = """
import sys, torch
import compressor
from transformers import AutoModelForCausalLM
source, out, keep = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
for layer in model.model.layers:
    block = layer.mlp
    if hasattr(block, "gate"):
        kept = list(range(keep))
        block.experts = torch.nn.ModuleList(block.experts[i] for i in kept)
        block.gate.weight = torch.nn.Parameter(block.gate.weight.data[kept].clone())
        block.n_routed_experts = block.gate.n_routed_experts = keep
model.config.n_routed_experts = keep
model.config.num_experts_per_tok = 1
model.save_pretrained(out, max_shard_size="5GB")
"""


def measure(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `command` run as a child of a fresh Python process."""
    result = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, check=True)
    seconds, rss = result.stdout.split()
    return float(seconds), float(rss)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--keep", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the GBs (default: a temp dir)")
    args = parser.parse_args(argv)
    from synthetic import sixteen_b_config, write_checkpoint

    with tempfile.TemporaryDirectory(prefix="moe-bench-export-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        config = sixteen_b_config(args.layers)
        start = time.perf_counter()
        source = write_checkpoint(tmp / "source", config, max_shard_bytes=2 * 10**9)
        size = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        print(f"generated {source.name}: {size / 2**30:.2f} GiB in {len(list(source.glob('*.safetensors')))} shards "
              f"({time.perf_counter() - start:.0f} s)")
        moe_layers = [str(layer) for layer in range(config["first_k_dense_replace"], args.layers)]
        plan = {"format_version": 1, "tool_version": "benchmark", "top_k": 1, "compensation": "none",
                "model": _identity(source),
                "layers": {layer: {"keep": list(range(args.keep))} for layer in moe_layers}}
        (tmp / "plan.json").write_text(json.dumps(plan))

        subprocess.run(["sync"], check=True)  # the generated GBs are flushed before anything is timed
        startup = measure([sys.executable, "-m", "compressor", "--version"])
        ours = measure([sys.executable, "-m", "compressor", "export", str(source), str(tmp / "plan.json"),
                        "-o", str(tmp / "ours"), "--no-validate", "--max-shard-size", "2GB"])
        out_size = sum(f.stat().st_size for f in (tmp / "ours").glob("*.safetensors"))
        subprocess.run(["sync"], check=True)
        copy = measure(["cp", "-r", str(tmp / "ours"), str(tmp / "copy")])
        shutil.rmtree(tmp / "copy")
        subprocess.run(["sync"], check=True)
        # export fsyncs every shard before its atomic rename; the same durability for cp means a sync after it
        durable = measure(["sh", "-c", f"cp -r '{tmp / 'ours'}' '{tmp / 'copy'}' && sync"])
        shutil.rmtree(tmp / "copy")
        naive = measure([sys.executable, "-c", _NAIVE, str(source), str(tmp / "naive"), str(args.keep)])

    print(f"\noutput: {out_size / 2**30:.2f} GiB ({args.keep} of 64 experts kept per MoE layer, top-1)")
    print(f"{'':34} {'seconds':>8} {'x cp':>6} {'peak RSS MiB':>13}")
    for label, (seconds, rss) in [("moe-compress export", ours), ("cp -r of the output", copy),
                                  ("cp -r + sync (as durable as export)", durable),
                                  ("load + prune + save_pretrained", naive)]:
        print(f"{label:34} {seconds:8.1f} {seconds / copy[0]:6.2f} {rss:13.0f}")
    print(f"(of the export's time, {startup[0]:.1f} s is Python + torch start-up, and each shard "
          "is fsync'ed before its atomic rename, which cp does not do)")
    print(f"\ntargets: export <= 1.3x cp -> {'met' if ours[0] <= 1.3 * copy[0] else 'NOT met'} "
          f"(vs cp + sync: {ours[0] / durable[0]:.2f}x); "
          f"peak RSS < 1024 MiB -> {'met' if ours[1] < 1024 else 'NOT met'}")
    return 0


def _identity(source: Path) -> dict:
    from compressor.families import detect_family
    from compressor.profiling.schema import config_hash

    config = json.loads((source / "config.json").read_text())
    family = detect_family(config)
    return {"source": str(source), "family": family.name, "config_hash": config_hash(config),
            "moe_layers": family.moe_layers(config),
            "experts_per_layer": {str(layer): family.num_experts(config, layer) for layer in family.moe_layers(config)},
            "top_k": family.top_k(config)}


if __name__ == "__main__":
    sys.exit(main())
