"""Serving throughput: vLLM and transformers, original vs compressed model, on the same prompts, next to the FLOP ratio.

    python benchmarks/serve.py [ORIGINAL] [COMPRESSED] [--json OUT.json]
    python benchmarks/serve.py [ORIGINAL] --per-layer [--coverage 0.9] [--domains code,math]

--per-layer: what non-uniform planning buys. ORIGINAL is profiled on the --domains (calibration split, --profile-tokens
tokens each); a coverage plan keeps, per layer, the fewest experts that cover --coverage of those domains' routing
(raised in steps of 0.005 until its total divides into the MoE layers), and a uniform plan keeps the same total, the
same number in every layer; both top-1, compensation none, exported side by side. vLLM runs both (the per-layer one
through moe-compress's vLLM plugin), and validation gives each one's perplexity on held-out text (evaluation split,
--ppl-tokens tokens per domain) against ORIGINAL's.

ORIGINAL defaults to models/reference. COMPRESSED defaults to work/demo/model (the demo's output) when it exists,
else a stand-in with the demo plan's structure (32 of 64 experts per layer, top-1; `renorm`, no fitting): speed
depends on the structure only. A DeepSeekMoE directory without the shipped configuration file (the reference) is
copied to a temporary directory and given it, since vLLM needs it.

Prompts: --prompts token sequences of --prompt-len tokens of demo evaluation text (code, math, english, french);
every prompt generates --new-tokens tokens greedily, EOS ignored. Both runtimes in fp32 by default (--dtype).
- vLLM (offline LLM API, in .venv-vllm, `scripts/setup_vllm.sh`; prefix cache off, eager mode): prompt tokens/s =
  prompt tokens / time of the batch with 1 generated token; generated tokens/s = generated tokens / time of the full
  batch (prefill included, as a user sees it). Best of --repeats.
- transformers (moe-compress's implementation, --threads threads): prompt tokens/s from one forward of the batch;
  generated tokens/s from `generate` on the batch with the KV cache. Best of --repeats.
The FLOP ratio (per-token forward FLOPs, original / compressed) is the limit the speed-up can approach.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from speed import forward_flops_per_token  # noqa: E402


def servable_copy(path: Path, scratch: Path) -> Path:
    """`path` itself if vLLM can load it, else a copy with moe-compress's configuration/modeling files."""
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "deepseek" or (path / "configuration_deepseek.py").exists():
        return path
    from compressor.modeling import write_modeling_files

    copy = scratch / f"{path.name}-servable"
    shutil.copytree(path, copy)
    write_modeling_files(copy)
    return copy


def stand_in(original: Path, scratch: Path) -> Path:
    """The demo plan's structure without its fitting: the first 32 of 64 experts per layer, top-1, renorm."""
    from compressor.export.exporter import ExportOptions, ExportValidation, RunOptions, export_checkpoint
    from compressor.families import detect_family
    from compressor.io import CheckpointReader
    from compressor.planning import Plan
    from compressor.profiling.schema import ModelIdentity, config_hash

    with CheckpointReader(original) as reader:
        config = reader.config
    family = detect_family(config)
    layers = family.moe_layers(config)
    identity = ModelIdentity(source=str(original), family=family.name, config_hash=config_hash(config, family.top_k_key),
                             moe_layers=layers, top_k=family.top_k(config),
                             experts_per_layer={str(l): family.num_experts(config, l) for l in layers})
    plan = Plan(model=identity, top_k=1, compensation="renorm",
                layers={str(l): {"keep": list(range(family.num_experts(config, l) // 2))} for l in layers})
    out = scratch / "compressed-stand-in"
    export_checkpoint(str(original), plan, out, ExportOptions(
        compensation="renorm", run=RunOptions(progress=False), validation=ExportValidation(enabled=False)))
    return out


def per_layer_pair(original: Path, scratch: Path, domains: list[str], coverage: float, tokens: int) -> dict:
    """Coverage-planned (non-uniform) and uniform outputs of `original` with the same total expert count."""
    from compressor.export.exporter import ExportOptions, ExportValidation, RunOptions, export_checkpoint
    from compressor.planning import PlanOptions, make_plan
    from compressor.profiling import ProfileOptions, profile_model
    from compressor.runtime import ForwardOptions

    profile = profile_model(str(original), {d: f"demo:{d}" for d in domains},
                            ProfileOptions(max_tokens=tokens, forward=ForwardOptions(seq_len=256, device="cpu"), progress=False))
    targets = {d: 1.0 for d in domains}
    layers = len(profile.model.moe_layers)
    while True:
        coverage_plan = make_plan(profile, PlanOptions(strategy="coverage", coverage=coverage, domains=targets,
                                                       top_k=1, compensation="none"))
        total = sum(len(keep) for keep in coverage_plan.kept().values())
        if total % layers == 0 or coverage >= 1:
            break
        coverage = min(1.0, round(coverage + 0.005, 3))
    uniform_plan = make_plan(profile, PlanOptions(strategy="uniform", keep=total // layers, domains=targets, top_k=1,
                                                  compensation="none"))
    outputs = {}
    for label, plan in (("coverage", coverage_plan), ("uniform", uniform_plan)):
        outputs[label] = scratch / label
        export_checkpoint(str(original), plan, outputs[label], ExportOptions(
            compensation="none", run=RunOptions(progress=False), validation=ExportValidation(enabled=False)))
    counts = {label: [len(keep) for keep in plan.kept().values()]
              for label, plan in (("coverage", coverage_plan), ("uniform", uniform_plan))}
    return {"outputs": outputs, "coverage": coverage, "counts": counts}


def perplexities(original: Path, compressed: Path, domains: list[str], tokens: int) -> dict[str, dict]:
    """Per domain: perplexity of `original` and `compressed` on the same held-out tokens (moe-compress validate)."""
    from compressor.runtime import ForwardOptions
    from compressor.validation.runner import ValidateOptions, validate_models

    report = validate_models(str(original), str(compressed), {d: f"demo:{d}" for d in domains},
                             ValidateOptions(max_tokens=tokens, forward=ForwardOptions(seq_len=256, device="cpu"), progress=False))
    return {name: {"original": d.perplexity_original, "compressed": d.perplexity_compressed}
            for name, d in report.domains.items()}


def demo_prompts(tokenizer_dir: Path, count: int, length: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from compressor.data import demo_documents

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    domains = ("code", "math", "english", "french")
    prompts: list[list[int]] = []
    for index in range(count):
        domain = domains[index % len(domains)]
        ids: list[int] = []
        for doc in demo_documents(domain, "evaluation")[index // len(domains):]:
            ids += tokenizer(doc)["input_ids"]
            if len(ids) >= length:
                break
        prompts.append(ids[:length])
    return prompts


def transformers_throughput(path: Path, prompts: list[list[int]], new_tokens: int, repeats: int, dtype) -> dict:
    from compressor.families import detect_family

    config = json.loads((path / "config.json").read_text())
    model = detect_family(config).model_class(config).from_pretrained(path, dtype=dtype).eval()
    batch = torch.tensor(prompts)
    prompt_tokens = batch.numel()
    best_prefill = best_generate = float("inf")
    with torch.no_grad():
        warm = batch[:2, :16]
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                       pad_token_id=0)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=batch, use_cache=False)
            best_prefill = min(best_prefill, time.perf_counter() - start)
            start = time.perf_counter()
            out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            best_generate = min(best_generate, time.perf_counter() - start)
    generated = (out.shape[1] - batch.shape[1]) * out.shape[0]
    return {"prompt_tokens": prompt_tokens, "generated_tokens": generated, "prompt_seconds": best_prefill,
            "generate_seconds": best_generate, "prompt_tokens_per_s": prompt_tokens / best_prefill,
            "generated_tokens_per_s": generated / best_generate}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("original", type=Path, nargs="?", default=REPO / "models" / "reference")
    parser.add_argument("compressed", type=Path, nargs="?", default=None)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2, help="transformers' torch threads")
    parser.add_argument("--vllm-python", default=None, help="interpreter with vLLM (default: .venv-vllm)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--per-layer", action="store_true", help="coverage-planned vs uniform output (see above)")
    parser.add_argument("--coverage", type=float, default=0.9, help="--per-layer: routing coverage per layer")
    parser.add_argument("--domains", default="code,math", help="--per-layer: domains the plans target")
    parser.add_argument("--profile-tokens", type=int, default=32768, help="--per-layer: profiled tokens per domain")
    parser.add_argument("--ppl-domains", default="code,math,english", help="--per-layer: perplexity domains")
    parser.add_argument("--ppl-tokens", type=int, default=16384, help="--per-layer: held-out tokens per domain")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from compressor.serving import check_plugin, check_servable, find_vllm_python, run_vllm

    python = find_vllm_python(args.vllm_python)
    per_layer, ppl = None, {}
    with tempfile.TemporaryDirectory(prefix="moe-compress-serve-bench-") as scratch:
        scratch = Path(scratch)
        models = {"original": servable_copy(args.original, scratch)}
        if args.per_layer:
            per_layer = per_layer_pair(args.original, scratch, args.domains.split(","), args.coverage,
                                       args.profile_tokens)
            models.update(per_layer["outputs"])
            check_plugin(python, check_servable(models["coverage"]))  # vLLM runs it only with the plugin
            compressed_name = (f"coverage plan ({per_layer['coverage']:g} of {args.domains}' routing, top-1, none) vs "
                               "uniform plan with the same total")
        else:
            compressed, compressed_name = args.compressed, str(args.compressed)
            if compressed is None:
                demo = REPO / "work" / "demo" / "model"
                compressed, compressed_name = demo, str(demo)
                if not (demo / "config.json").exists():
                    compressed = stand_in(args.original, scratch)
                    compressed_name = "stand-in: first 32 of 64 experts per layer, top-1, renorm"
            models["compressed"] = servable_copy(compressed, scratch)
        prompts = demo_prompts(args.original, args.prompts, args.prompt_len)
        request = {
            "models": [{"path": str(path), "label": label} for label, path in models.items()],
            "dtype": args.dtype,
            "max_model_len": args.prompt_len + args.new_tokens + 16,
            "throughput": {"prompts": prompts, "max_tokens": args.new_tokens, "repeats": args.repeats},
        }
        start = time.perf_counter()
        result = run_vllm(python, request, timeout=3600)
        vllm_wall = time.perf_counter() - start
        rows = {("vllm", entry["label"]): entry["throughput"] for entry in result["models"]}
        if not args.skip_transformers:
            dtype = getattr(torch, args.dtype)
            for label, path in models.items():
                rows[("transformers", label)] = transformers_throughput(path, prompts, args.new_tokens, args.repeats,
                                                                         dtype)
        if per_layer:
            ppl = {label: perplexities(args.original, models[label], args.ppl_domains.split(","), args.ppl_tokens)
                   for label in per_layer["outputs"]}
        configs = {label: json.loads((path / "config.json").read_text()) for label, path in models.items()}
    seq = args.prompt_len + args.new_tokens // 2
    flops = {label: forward_flops_per_token(config, seq) for label, config in configs.items()}
    flop_ratios = {label: flops["original"] / flops[label] for label in flops if label != "original"}
    versions = result["versions"]
    print(f"original {args.original}; compressed {compressed_name}")
    if per_layer:
        for label, counts in per_layer["counts"].items():
            print(f"  {label}: experts kept per MoE layer {counts} (total {sum(counts)})")
    print(f"{args.prompts} prompts x {args.prompt_len} tokens, {args.new_tokens} generated each, {args.dtype}; "
          f"vLLM {versions['vllm']} ({result.get('platform')}, torch {versions['torch']}); "
          f"transformers threads {args.threads}; best of {args.repeats}")
    print(f"{'runtime':14} {'model':11} {'prompt tok/s':>13} {'generated tok/s':>16}")
    for (runtime, label), row in rows.items():
        print(f"{runtime:14} {label:11} {row['prompt_tokens_per_s']:13.0f} {row['generated_tokens_per_s']:16.0f}")
    speedups = {}
    for runtime in ("vllm", "transformers"):
        for label in flop_ratios:
            if (runtime, label) in rows:
                before, after = rows[(runtime, "original")], rows[(runtime, label)]
                speedups[f"{runtime} {label}"] = {key: after[key] / before[key] for key in ("prompt_tokens_per_s",
                                                                                          "generated_tokens_per_s")}
                print(f"speed-up {runtime:12} {label:11}: prompt "
                      f"{speedups[f'{runtime} {label}']['prompt_tokens_per_s']:.2f}x, generated "
                      f"{speedups[f'{runtime} {label}']['generated_tokens_per_s']:.2f}x")
    for label, ratio in flop_ratios.items():
        print(f"FLOP ratio {label} (the limit): {ratio:.2f}x")
    print(f"vLLM run ({len(models)} models, loads included) {vllm_wall:.0f} s")
    for label, domains in ppl.items():
        print(f"perplexity {label:9}: " + ", ".join(
            f"{name} {d['original']:.2f} -> {d['compressed']:.2f} ({100 * (d['compressed'] / d['original'] - 1):+.1f}%)"
            for name, d in domains.items()))
    if args.json:
        args.json.write_text(json.dumps({
            "settings": vars(args) | {"original": str(args.original), "compressed": compressed_name,
                                      "json": str(args.json), "vllm_python": python},
            "versions": versions, "platform": result.get("platform"), "flop_ratios": flop_ratios,
            "rows": [{"runtime": r, "model": m, **row} for (r, m), row in rows.items()], "speedups": speedups,
            "per_layer": per_layer and {"coverage": per_layer["coverage"], "counts": per_layer["counts"],
                                        "perplexity": ppl},
        }, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
