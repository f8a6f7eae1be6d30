"""Export speed and memory on a checkpoint with a real model's widths and tensor layout.

    python benchmarks/export.py [--model deepseek-moe-16b|qwen3-30b-a3b|deepseek-v3] [--layers 4] [--keep-fraction 0.5]

Generates a random checkpoint (benchmarks/synthetic.py: bf16 with DeepSeekMoE-16B's hidden 2048, 64 experts x 1408,
2 shared, vocab 102400, layer 0 dense; or Qwen3-30B-A3B's 128 experts x 768, vocab 151936; or FP8 with block
scales at DeepSeek-V3's hidden 7168, 256 experts x 2048 in 8 groups, vocab 129280, layer 0 dense; 2 GB shards,
which cut through a V3 MoE layer of 11 GB), then measures, each in a fresh process, wall time and peak RSS of:
  1. `moe-compress export` (uniform plan keeping --keep-fraction of each layer's experts, top-1, compensation none;
     for a group-limited router such as V3's, the first --keep-fraction of every group, as the router requires);
  2. the baseline: a kernel copy (copy_file_range, as cp does) of exactly the bytes export keeps, from the same
     source files, one file per output shard, all fsync'ed at the end as export does — the same bytes from the same
     state;
  3. `cp -r` of the exported output, alone and followed by `sync` (for reference);
  4. transformers: load the model + drop the experts + `save_pretrained` (the naive path, once; skipped for FP8
     checkpoints, which transformers dequantizes or refuses without a GPU, and with --no-naive).
Export, baseline and cp alternate their order over --repeats rounds; before every timed run the page cache is
dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`, where permitted; the script says when it is not), so each run
reads cold files. Targets: export <= 1.3x the baseline, export peak RSS < 1 GiB whatever the checkpoint size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from synthetic import CONFIGS, write_checkpoint  # noqa: E402

_MEASURE = """
import resource, subprocess, sys, time
start = time.perf_counter()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
seconds = time.perf_counter() - start
print(seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""

_NAIVE = """
import json, sys, torch
from compressor.families import open_checkpoint
source, out, keep = sys.argv[1], sys.argv[2], int(sys.argv[3])
checkpoint = open_checkpoint(source)
family, config = checkpoint.family, checkpoint.config
model = family.model_class(config).from_pretrained(source, dtype=torch.bfloat16)
kept = torch.arange(keep)
for layer in family.moe_layers(config):  # slice the fused experts and the router rows in memory
    block = model.get_submodule(family.decoder_layer_path(layer)).get_submodule(family.block_attr)
    for module in (block.get_submodule(family.experts_attr), block.get_submodule(family.router_attr)):
        for name, parameter in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(parameter.data[kept].clone(), requires_grad=False))
        for attribute in ("num_experts", "n_routed_experts"):
            if hasattr(module, attribute):
                setattr(module, attribute, keep)
pruned = family.pruned_config(config, {layer: list(range(keep)) for layer in family.moe_layers(config)}, 1)
model.config = type(model.config)(**pruned)
model.save_pretrained(out, max_shard_size="5GB")
"""


_COPY_KEPT = """
import json, os, sys
plan = json.loads(open(sys.argv[1]).read())
outputs = []
for index, ranges in enumerate(plan):
    out = open(os.path.join(sys.argv[2], f"shard-{index}.bin"), "wb")
    for path, offset, count in ranges:
        with open(path, "rb") as source:
            done = 0
            while done < count:
                done += os.copy_file_range(source.fileno(), out.fileno(), count - done, offset + done)
    outputs.append(out)
for out in outputs:  # every shard fsync'ed at the end, as the export does
    os.fsync(out.fileno())
    out.close()
"""


_IMPORTS = """
import sys
from compressor.export import exporter  # noqa: F401
from compressor.families import open_checkpoint
open_checkpoint(sys.argv[1]).close()
"""


def measure(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `command` run as a child of a fresh Python process."""
    result = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, check=True)
    seconds, rss = result.stdout.split()
    return float(seconds), float(rss)


def drop_caches() -> bool:
    """Flush and drop the page cache so the next run reads cold files; False where that is not permitted."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def kept_ranges(source: Path, output: Path) -> list[list[tuple[str, int, int]]]:
    """Per output shard, the (source file, offset, bytes) of every tensor it holds, in output order (a sliced
    tensor, e.g. a router, counts as its first rows)."""
    from compressor.export.mapping import TensorMapping
    from compressor.families import open_checkpoint
    from compressor.io import CheckpointReader

    plan = json.loads((output / "compression_plan.json").read_text())
    checkpoint = open_checkpoint(source)
    mapping = TensorMapping(checkpoint.layout, {int(layer): entry["keep"] for layer, entry in plan["layers"].items()})
    origin = {tensor.name: tensor.source for tensor in mapping.plan(checkpoint.reader)}
    with CheckpointReader(output) as out:
        ranges = []
        for shard in out.shards():
            shard_ranges = []
            for name in out.tensors_in_shard(shard):
                info = checkpoint.reader.info(origin[name])
                shard_ranges.append((str(info.shard), info.data_offsets[0], out.info(name).nbytes))
            ranges.append(shard_ranges)
    checkpoint.close()
    return ranges


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), default="deepseek-moe-16b", help="whose widths")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--keep-fraction", type=float, default=0.5, help="share of each layer's experts kept")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the GBs (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every measurement")
    parser.add_argument("--no-naive", action="store_true", help="skip transformers' load + prune + save")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="moe-bench-export-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        config = CONFIGS[args.model](args.layers)
        start = time.perf_counter()
        source = write_checkpoint(tmp / "source", config, max_shard_bytes=2 * 10**9)
        size = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        print(f"generated {source.name}: {size / 2**30:.2f} GiB in {len(list(source.glob('*.safetensors')))} shards "
              f"({time.perf_counter() - start:.0f} s)")
        identity = _identity(source)
        experts = max(identity["experts_per_layer"].values())
        kept = kept_experts(config, experts, args.keep_fraction)
        keep = len(kept)
        plan = {"format_version": 1, "tool_version": "benchmark", "top_k": 1, "compensation": "none",
                "model": identity, "layers": {str(layer): {"keep": kept} for layer in identity["moe_layers"]}}
        (tmp / "plan.json").write_text(json.dumps(plan))

        export = [sys.executable, "-m", "compressor", "export", str(source), str(tmp / "plan.json"),
                  "-o", str(tmp / "ours"), "--no-validate", "--max-shard-size", "2GB"]
        subprocess.run(export, check=True, stdout=subprocess.DEVNULL)  # once, to learn the output's layout
        out_size = sum(f.stat().st_size for f in (tmp / "ours").glob("*.safetensors"))
        (tmp / "kept.json").write_text(json.dumps(kept_ranges(source, tmp / "ours")))
        shutil.move(tmp / "ours", tmp / "reference-output")
        (tmp / "copy_kept.py").write_text(_COPY_KEPT)
        sides = {
            "moe-compress export": (export, tmp / "ours"),
            "baseline: kernel copy of the kept bytes": (
                ["sh", "-c", f"mkdir '{tmp / 'copy'}' && exec '{sys.executable}' '{tmp / 'copy_kept.py'}' "
                             f"'{tmp / 'kept.json'}' '{tmp / 'copy'}'"], tmp / "copy"),
            "cp -r of the output": (["cp", "-r", str(tmp / "reference-output"), str(tmp / "cp")], tmp / "cp"),
            "cp -r of the output + sync": (["sh", "-c", f"cp -r '{tmp / 'reference-output'}' '{tmp / 'cp'}' && sync"],
                                           tmp / "cp"),
        }
        results: dict[str, list[tuple[float, float]]] = {label: [] for label in sides}
        cold = True
        drop_caches()  # start-up as the export pays it: the modules it imports, read from a cold page cache
        startup = measure([sys.executable, "-c", _IMPORTS, str(source)])
        for round_ in range(args.repeats):
            order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
            for label in order:
                command, produced = sides[label]
                cold = drop_caches() and cold
                results[label].append(measure(command))
                shutil.rmtree(produced)
        quantized = "quantization_config" in config
        naive = None if args.no_naive or quantized else measure(
            [sys.executable, "-c", _NAIVE, str(source), str(tmp / "naive"), str(keep)])

    print(f"\noutput: {out_size / 2**30:.2f} GiB ({keep} of {experts} experts kept per MoE layer, top-1); "
          f"{args.repeats} rounds, order alternated, "
          + ("page cache dropped before every run" if cold else "page cache NOT dropped (not permitted here)"))
    baseline = statistics.median(s for s, _ in results["baseline: kernel copy of the kept bytes"])
    print(f"{'':42} {'min s':>7} {'median s':>9} {'x baseline':>11} {'peak RSS MiB':>13}")
    for label, runs in results.items():
        seconds = [s for s, _ in runs]
        median = statistics.median(seconds)
        print(f"{label:42} {min(seconds):7.1f} {median:9.1f} {median / baseline:11.2f} {max(r for _, r in runs):13.0f}")
    if naive is not None:
        print(f"{'load + prune + save_pretrained (once)':42} {naive[0]:7.1f} {naive[0]:9.1f} "
              f"{naive[0] / baseline:11.2f} {naive[1]:13.0f}")
    ours = statistics.median(s for s, _ in results["moe-compress export"])
    rss = max(r for _, r in results["moe-compress export"])
    print(f"(of the export's time, {startup[0]:.1f} s is start-up: Python, torch and transformers' config and "
          "conversion modules imported, the source's config checked)")
    cp = statistics.median(s for s, _ in results["cp -r of the output"])
    cp_sync = statistics.median(s for s, _ in results["cp -r of the output + sync"])
    print(f"\ntargets: export <= 1.3x baseline -> {ours / baseline:.2f}x, {'met' if ours <= 1.3 * baseline else 'NOT met'};"
          f" peak RSS < 1024 MiB -> {rss:.0f}, {'met' if rss < 1024 else 'NOT met'}"
          f"\n(export = {ours / cp:.2f}x `cp -r`, {ours / cp_sync:.2f}x `cp -r` + `sync`)")
    return 0


def kept_experts(config: dict, experts: int, fraction: float) -> list[int]:
    """The experts the benchmark's plan keeps in each MoE layer: the first `fraction` of them, or, for a
    group-limited router (DeepSeek-V3's n_group / topk_group), the first `fraction` of every group (at least the
    router's minimum per group), listed group by group, as the export requires."""
    from compressor.families import detect_family

    router = detect_family(config).router(config)
    if not router.grouped:
        return list(range(max(1, round(fraction * experts))))
    groups = router.n_group
    size = experts // groups
    per = max(router.min_kept_per_group, round(fraction * size))
    return [group * size + i for group in range(groups) for i in range(per)]


def _identity(source: Path) -> dict:
    from compressor.families import detect_family
    from compressor.profiling.schema import config_hash

    config = json.loads((source / "config.json").read_text())
    family = detect_family(config)
    return {"source": str(source), "family": family.name, "config_hash": config_hash(config, family.top_k_key),
            "moe_layers": family.moe_layers(config),
            "experts_per_layer": {str(layer): family.num_experts(config, layer) for layer in family.moe_layers(config)},
            "top_k": family.top_k(config)}


if __name__ == "__main__":
    sys.exit(main())
