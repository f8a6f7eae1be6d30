"""Head to head with llm-compressor's REAP (`REAPPruningModifier`) on the Qwen3-MoE reference model.

    python benchmarks/peers.py [--model models/reference-qwen3] [--calibration-tokens 65536] [--threads 1]
                               [--criteria frequency,reap] [--work work/peers] [--json OUT.json]

Both tools keep the same share of experts (--keep-fraction 0.5: 64 of 128 per layer) chosen from the same
calibration tokens: --calibration-tokens of the `train` split of the demo domains code and math (half each),
tokenized with the model's tokenizer and packed into --seq-len sequences (full-length rows only), written once
as pre-tokenized `.jsonl` files (`{"input_ids": [...]}` per line). moe-compress profiles them per domain
(`code=code.jsonl`, `math=math.jsonl`); llm-compressor gets their concatenation as a `datasets.Dataset` of the
same rows (benchmarks/peers_reap_runner.py), every row once, in order.

- REAP: `oneshot(recipe=REAPPruningModifier(sparsity=1 - keep_fraction))` in llm-compressor's own venv
  (scripts/setup_llmcompressor.sh; run here when the venv is missing), one process that loads the model,
  calibrates, prunes and saves. Its defaults otherwise, except `moe_calibrate_all_experts=False` (REAP only reads
  the routed tokens' outputs and says so in its log; the saliency is the same, the pass is cheaper).
  A second REAP run (skip it with --no-reap-workaround) works around what llm-compressor 0.14 does to this model:
  its sequential pipeline hands transformers' `create_causal_mask` a copy of the config without the attention
  implementation, which then returns no mask, so every layer is calibrated with bidirectional attention
  (checked: the MoE inputs it sees equal the model's under an all-zero 4-D mask, not under its causal one). The
  workaround passes a 4-D causal mask with every batch (a DataLoader; create_causal_mask returns a 4-D mask as
  given), after which REAP's choice equals an independent re-implementation of sequential REAP exactly.
- moe-compress, through its CLI: `profile` once, then per criterion (--criteria) `plan --keep-fraction 0.5
  --domains code,math`, and `export` three ways: top-8 (REAP's routing width) with compensation `none`, the same
  plan with `distill --distill-router`, and top-1 with `distill --distill-router` (REAP has no top-1). Fitted
  modes calibrate on the same .jsonl files (all of their tokens). Exports run with `--no-validate`: validation
  is timed for nobody.

Every step is a fresh process run one after another with the same environment (OMP/MKL threads = --threads);
wall time from spawn to exit, CPU time (user + system) and peak RSS (the process's ru_maxrss; all from wait4)
are measured the same way for both tools. moe-compress's time per output is profile + plan + export (the profile is shared by every variant
and also reported alone); REAP's is its one process.

Every output (and the original) is then evaluated with `moe-compress validate ORIGINAL OUT -d code=demo:code
-d math=demo:math -d english=demo:english -d french=demo:french -d legal=demo:legal --max-tokens --seq-len`
(held-out evaluation split; code and math are the targets) and loaded in a fresh process of this venv's
transformers without importing moe-compress (AutoModelForCausalLM, no missing/unexpected keys, finite logits).
Prints one markdown table; --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this tree's compressor (the CLI steps get it through PYTHONPATH)
RUNNER = REPO / "benchmarks" / "peers_reap_runner.py"
TARGETS = ("code", "math")
EVALUATION = ("code", "math", "english", "french", "legal")
MARKER = ".moe-compress-peers-benchmark"
DEFAULT_LLMC_VENV = Path.home() / ".cache" / "moe-compress" / "venv-llmcompressor-0.14.0.1"

LOAD_CHECK = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
import transformers
result = {"transformers": transformers.__version__}
try:
    model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, output_loading_info=True)
    problems = {key: [str(v) for v in values][:5] for key, values in info.items() if values}
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(sys.argv[1])
    with torch.no_grad():
        logits = model(torch.arange(2, 34).unsqueeze(0)).logits
    if not torch.isfinite(logits).all():
        problems["logits"] = ["not finite"]
    result.update(loads=not problems, problems=problems, experts=getattr(model.config, "num_experts", None),
                  top_k=model.config.num_experts_per_tok, class_name=type(model).__name__)
except Exception as error:  # noqa: BLE001 - the answer is yes/no and why
    result.update(loads=False, problems={"error": [f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"]})
print(json.dumps(result))
"""


class StepFailed(RuntimeError):
    pass


@dataclass
class Measured:
    name: str
    seconds: float
    cpu_seconds: float
    peak_rss_mib: float
    returncode: int
    log: str


@dataclass
class Row:
    label: str
    tool: str
    path: str
    slug: str = ""
    steps: list[Measured] = field(default_factory=list)
    perplexity: dict[str, float] = field(default_factory=dict)
    change: dict[str, float] = field(default_factory=dict)
    kl: dict[str, float] = field(default_factory=dict)
    weights_bytes: int = 0
    parameters: int = 0
    experts: int | None = None
    top_k: int | None = None
    loads: dict = field(default_factory=dict)
    shared_with_reap: float | None = None
    reap_info: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)
    original_perplexity: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return sum(step.seconds for step in self.steps)

    @property
    def peak_rss_mib(self) -> float:
        return max((step.peak_rss_mib for step in self.steps), default=0.0)


def run_measured(name: str, command: list[str], env: dict, logs: Path, check: bool = True) -> Measured:
    """Run `command` as a fresh process; wall time from spawn to exit and its peak RSS (ru_maxrss, KiB on Linux)."""
    log = logs / f"{name}.log"
    with log.open("w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
    measured = Measured(name, seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, process.returncode,
                        str(log))
    print(f"  {name}: {seconds:.1f} s (CPU {measured.cpu_seconds:.1f} s), peak RSS {measured.peak_rss_mib:.0f} MiB"
          + ("" if process.returncode == 0 else f", exit {process.returncode}"), flush=True)
    if check and process.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise StepFailed(f"{name} exited {process.returncode} (log {log}):\n  " + "\n  ".join(tail))
    return measured


def safetensors_size(directory: Path) -> tuple[int, int]:
    """(bytes of the *.safetensors files, parameters in them) from the headers."""
    total_bytes, parameters = 0, 0
    for path in sorted(directory.glob("*.safetensors")):
        total_bytes += path.stat().st_size
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in entry["shape"]:
                count *= dim
            parameters += count
    return total_bytes, parameters


def write_calibration(model: Path, tokens: int, seq_len: int, directory: Path) -> dict[str, Path]:
    """Per target domain a .jsonl of full-length `input_ids` rows (tokens // len(TARGETS) each, rounded down to
    whole sequences), tokenized and packed exactly as moe-compress packs text, plus `all.jsonl` (their
    concatenation, REAP's dataset)."""
    from transformers import AutoTokenizer

    from compressor.data.batching import token_sequences
    from compressor.data.sources import load_source

    tokenizer = AutoTokenizer.from_pretrained(model)
    directory.mkdir(parents=True)
    per_domain = (tokens // len(TARGETS)) // seq_len * seq_len
    if per_domain < seq_len:
        raise SystemExit(f"error: --calibration-tokens {tokens} gives no full {seq_len}-token sequence per domain")
    files: dict[str, Path] = {}
    everything = []
    for domain in TARGETS:
        rows = [row for row in token_sequences(load_source(f"demo:{domain}@train"), tokenizer, seq_len, per_domain)
                if len(row) == seq_len]
        if len(rows) * seq_len < per_domain:
            raise SystemExit(f"error: demo:{domain}@train has fewer than {per_domain} tokens")
        files[domain] = directory / f"{domain}.jsonl"
        files[domain].write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in rows))
        everything += rows
    files["all"] = directory / "all.jsonl"
    files["all"].write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in everything))
    return files


def llmcompressor_python(explicit: str | None, setup: bool) -> Path:
    if explicit:
        python = Path(explicit)
    else:
        venv = Path(os.environ.get("LLMCOMPRESSOR_VENV", DEFAULT_LLMC_VENV))
        python = venv / "bin" / "python"
        if setup:
            result = subprocess.run(["bash", str(REPO / "scripts" / "setup_llmcompressor.sh")], check=False,
                                    env={**os.environ, "LLMCOMPRESSOR_VENV": str(venv)})
            if result.returncode != 0:
                raise SystemExit("error: scripts/setup_llmcompressor.sh failed (its error above); "
                                 "pass --llmcompressor-python to use another interpreter")
    if not python.exists():
        raise SystemExit(f"error: {python} does not exist (run scripts/setup_llmcompressor.sh)")
    return python


def evaluate(row: Row, original: Path, args, env, logs: Path, work: Path) -> None:
    out = work / "validation" / f"{row.slug}.json"
    command = [sys.executable, "-m", "compressor", "validate", str(original), row.path, "-o", str(out),
               "--max-tokens", str(args.eval_tokens), "--seq-len", str(args.seq_len)]
    for domain in EVALUATION:
        command += ["-d", f"{domain}=demo:{domain}"]
    run_measured(f"validate-{row.slug}", command, env, logs)
    report = json.loads(out.read_text())
    for domain, numbers in report["domains"].items():
        row.perplexity[domain] = numbers["perplexity_compressed"]
        row.change[domain] = numbers["perplexity_increase"]
        row.kl[domain] = numbers["kl_mean"]
    row.original_perplexity = {d: n["perplexity_original"] for d, n in report["domains"].items()}


def load_check(path: str, env) -> dict:
    clean = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", LOAD_CHECK, path], check=False, capture_output=True, text=True,
                            env=clean, cwd="/")
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"loads": False, "problems": {"error": result.stderr.strip().splitlines()[-1:]}}


def kept_sets_of_plan(plan: Path) -> dict[str, set[int]]:
    return {layer: set(entry["keep"]) for layer, entry in json.loads(plan.read_text())["layers"].items()}


def fmt_int(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def table(rows: list[Row], original: Row, profile: Measured) -> str:
    head = ["model", "experts, top-k"]
    head += [f"{d}{' (target)' if d in TARGETS else ''}" for d in EVALUATION]
    head += ["weights MiB", "params", "wall s", "wall s from the model", "CPU s", "peak RSS MiB",
             "loads in transformers " + original.loads.get("transformers", "?")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in [original] + rows:
        cells = [row.label, f"{row.experts}, top-{row.top_k}"]
        for domain in EVALUATION:
            if row is original:
                cells.append(f"{row.perplexity[domain]:.3f}")
            else:
                cells.append(f"{row.perplexity[domain]:.3f} ({row.change[domain] * 100:+.1f}%)")
        cells += [f"{row.weights_bytes / 2**20:.1f}", fmt_int(row.parameters)]
        own = [step for step in row.steps if step is not profile]
        if row is original:
            cells += ["—", "—", "—", "—"]
        else:
            cells += [f"{sum(s.seconds for s in own):.1f}", f"{row.seconds:.1f}",
                      f"{sum(s.cpu_seconds for s in own):.1f}", f"{max(s.peak_rss_mib for s in own):.0f}"]
        loads = row.loads.get("loads")
        cells.append("yes" if loads else "no: " + "; ".join(f"{k}: {v}" for k, v in row.loads.get("problems", {})
                                                             .items()))
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["moe-compress profile (every moe-compress row uses it)", "—"] + ["—"] * len(EVALUATION)
    cells += ["—", "—", f"{profile.seconds:.1f}", f"{profile.seconds:.1f}", f"{profile.cpu_seconds:.1f}",
              f"{profile.peak_rss_mib:.0f}", "—"]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def config_changes(original: Path, output: Path) -> list[str]:
    """Keys of config.json / tokenizer_config.json that differ between the original and an output."""
    changes = []
    for name in ("config.json", "tokenizer_config.json"):
        if not (output / name).exists():
            changes.append(f"{name}: missing")
            continue
        before, after = json.loads((original / name).read_text()), json.loads((output / name).read_text())
        for key in sorted(set(before) | set(after)):
            if before.get(key, "<absent>") != after.get(key, "<absent>"):
                changes.append(f"{name} {key}: {before.get(key, '<absent>')} -> {after.get(key, '<absent>')}")
    return changes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "reference-qwen3")
    parser.add_argument("--keep-fraction", type=float, default=0.5)
    parser.add_argument("--calibration-tokens", type=int, default=65536,
                        help="calibration tokens in all, half code, half math (train split)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration batch size, both tools")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="validate --max-tokens per domain")
    parser.add_argument("--criteria", default="frequency,reap", help="moe-compress plan criteria to compare")
    parser.add_argument("--variants", default="top8-none,top8-distill,top1-distill",
                        help="moe-compress exports per criterion")
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL/torch threads of every step")
    parser.add_argument("--no-reap-workaround", action="store_true",
                        help="skip the second REAP run (4-D causal mask in its batches, see below)")
    parser.add_argument("--reap-precision", default="auto", help="oneshot's precision (auto: the checkpoint's)")
    parser.add_argument("--llmcompressor-python", default=None,
                        help="python of a venv with llmcompressor (default: $LLMCOMPRESSOR_VENV or "
                             f"{DEFAULT_LLMC_VENV}, set up by scripts/setup_llmcompressor.sh)")
    parser.add_argument("--no-setup", action="store_true", help="do not run scripts/setup_llmcompressor.sh")
    parser.add_argument("--work", type=Path, default=REPO / "work" / "peers",
                        help="outputs, logs and validation reports (replaced if it holds an earlier run)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = parser.parse_args(argv)

    model = args.model.resolve()
    criteria = [c for c in args.criteria.split(",") if c]
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        if variant not in ("top8-none", "top8-distill", "top1-distill"):
            raise SystemExit(f"error: unknown variant {variant!r}")
    top_k = json.loads((model / "config.json").read_text())["num_experts_per_tok"]
    work = args.work.resolve()
    if work.exists():
        if not (work / MARKER).exists():
            raise SystemExit(f"error: {work} exists and is not an earlier run of this benchmark; choose --work")
        shutil.rmtree(work)
    for sub in ("logs", "outputs", "validation", "plans"):
        (work / sub).mkdir(parents=True)
    (work / MARKER).touch()
    logs, outputs = work / "logs", work / "outputs"

    python_llmc = llmcompressor_python(args.llmcompressor_python, not args.no_setup)
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    reap_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}

    started = time.perf_counter()
    files = write_calibration(model, args.calibration_tokens, args.seq_len, work / "calibration")
    rows_per_domain = len(files["code"].read_text().splitlines())
    calibration_tokens = rows_per_domain * args.seq_len * len(TARGETS)
    print(f"calibration: {calibration_tokens} tokens ({rows_per_domain} x {args.seq_len} per domain: "
          f"{', '.join(TARGETS)}, train split) in {work / 'calibration'}; threads {threads}", flush=True)

    rows: list[Row] = []
    # REAP (llm-compressor), one process: load, calibrate, prune, save.
    reap_runs = [("reap", "llm-compressor REAP", [])]
    if not args.no_reap_workaround:
        reap_runs.append(("reap-causal", "llm-compressor REAP, causal-mask workaround", ["--causal-mask-in-data"]))
    for slug, label, extra in reap_runs:
        row = Row(label, "llm-compressor", str(outputs / slug), slug=slug)
        report = work / f"{slug}-report.json"
        row.steps.append(run_measured(f"{slug}-oneshot", [
            str(python_llmc), str(RUNNER), str(model), str(files["all"]), row.path,
            "--sparsity", repr(1 - args.keep_fraction), "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--threads", threads, "--precision", args.reap_precision,
            "--report", str(report), *extra], reap_env, logs))
        row.reap_info = json.loads(report.read_text())
        row.kept = {name.split(".")[2]: set(ids) for name, ids in row.reap_info["kept"].items()}
        rows.append(row)
    reap = rows[0]
    reap_info, reap_kept = reap.reap_info, reap.kept

    # moe-compress through its CLI.
    cli = [sys.executable, "-m", "compressor"]
    profile_path = work / "profile.json"
    profile = run_measured("profile", cli + [
        "profile", str(model), "-d", f"code={files['code']}", "-d", f"math={files['math']}", "-o", str(profile_path),
        "--max-tokens", str(rows_per_domain * args.seq_len), "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size)], env, logs)
    for criterion in criteria:
        plans = {}
        for k in sorted({top_k if v.startswith("top8") else 1 for v in variants}, reverse=True):
            plans[k] = work / "plans" / f"{criterion}-top{k}.json"
            plans[k, "step"] = run_measured(f"plan-{criterion}-top{k}", cli + [
                "plan", str(profile_path), "-o", str(plans[k]), "--keep-fraction", repr(args.keep_fraction),
                "--domains", ",".join(TARGETS), "--criterion", criterion, "--top-k", str(k),
                "--compensation", "none"], env, logs)
        for variant in variants:
            k = top_k if variant.startswith("top8") else 1
            compensation = variant.split("-")[1]
            slug = f"{criterion}-{variant}"
            row = Row(f"moe-compress {criterion}, {compensation}" + (" + router" if compensation == "distill" else ""),
                      "moe-compress", str(outputs / slug), slug=slug)
            command = cli + ["export", str(model), str(plans[k]), "-o", row.path, "--compensation", compensation,
                             "--no-validate", "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
            if compensation == "distill":
                command += ["--distill-router", "--calibration", f"code={files['code']}",
                            "--calibration", f"math={files['math']}", "--max-tokens", str(calibration_tokens)]
            row.steps = [profile, plans[k, "step"], run_measured(f"export-{slug}", command, env, logs)]
            ours = kept_sets_of_plan(plans[k])
            row.shared_with_reap = (sum(len(ours[l] & reap_kept[l]) for l in ours)
                                    / sum(len(reap_kept[l]) for l in ours))
            rows.append(row)

    original = Row("original", "-", str(model))
    for row in rows:
        evaluate(row, model, args, env, logs, work)
    original.perplexity = rows[0].original_perplexity
    for row in [original] + rows:
        row.weights_bytes, row.parameters = safetensors_size(Path(row.path))
        row.loads = load_check(row.path, env)
        row.experts, row.top_k = row.loads.get("experts"), row.loads.get("top_k")
    total = time.perf_counter() - started

    print()
    print(f"{model.name}: keep {args.keep_fraction:.0%} of experts per layer; calibration {calibration_tokens} "
          f"tokens (code + math, train split, {args.seq_len}-token rows), same rows for both tools; validation "
          f"{args.eval_tokens} held-out tokens per domain; {threads} thread(s) per step")
    print()
    print(table(rows, original, profile))
    print()
    print(f"wall s: a row's own processes, each fresh and timed from spawn to exit (REAP: its one oneshot process, "
          f"imports {reap_info['seconds']['imports']:.1f} s + oneshot {reap_info['seconds']['oneshot']:.1f} s inside "
          f"it; moe-compress: plan + export); 'from the model' adds moe-compress's profile ({profile.seconds:.1f} s). "
          "peak RSS: the largest ru_maxrss of the row's own processes.")
    for row in rows[1:]:
        if row.shared_with_reap is None:
            row.shared_with_reap = (sum(len(row.kept[l] & reap_kept[l]) for l in row.kept)
                                    / sum(len(reap_kept[l]) for l in row.kept))
        print(f"  {row.label}, top-{row.top_k}: kept experts also kept by REAP {row.shared_with_reap:.1%}")
    print("REAP output vs the original: " + "; ".join(config_changes(model, Path(reap.path))))
    print(f"llm-compressor venv: {', '.join(f'{k} {v}' for k, v in reap_info['versions'].items())}; "
          f"benchmark total {total / 60:.1f} min; outputs and logs in {work}")
    if args.json:
        args.json.write_text(json.dumps({
            "settings": {**{k: str(v) for k, v in vars(args).items()}, "calibration_tokens_used": calibration_tokens},
            "reap": reap_info,
            "profile": asdict(profile),
            "rows": [{**asdict(row), "seconds": row.seconds, "peak_rss_mib": row.peak_rss_mib}
                     for row in [original] + rows],
            "total_seconds": total,
        }, indent=1, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StepFailed as failure:
        print(f"error: {failure}", file=sys.stderr)
        sys.exit(1)
