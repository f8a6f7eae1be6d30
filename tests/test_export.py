"""The export stage (`moe-compress export`, compressor.export) on tiny random checkpoints.

Expectations are computed here, independently of the exporter: safetensors files are parsed by hand,
and the reference for `none` is the ORIGINAL model whose MoE blocks are replaced by a re-implementation
that sets the dropped experts' router logits to -inf and routes top-K (written below from the original
weights). Outputs are loaded with `import compressor`, with `trust_remote_code=True` in a fresh process
where `compressor` cannot be imported, and (DeepSeek-V2) with plain transformers.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import compressor
from compressor.errors import UserError
from compressor.export import ExportOptions, export_checkpoint
from compressor.export.exporter import ExportValidation, FitOptions, RunOptions
from compressor.families import detect_family
from compressor.modeling import DeepseekConfig, DeepseekForCausalLM
from compressor.planning import Plan
from compressor.profiling.schema import config_hash
from helpers import one_thread, run_cli, write_jsonl  # noqa: F401  (one_thread: a fixture)

MOE_LAYERS = (1, 2)
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
V2_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=8,
               n_shared_experts=1, num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
               qk_rope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2, topk_method="group_limited_greedy",
               routed_scaling_factor=2.0, max_position_embeddings=64)
UNIFORM = {1: [0, 2, 5, 7], 2: [6, 1, 3, 2]}  # listed out of order on purpose
NON_UNIFORM = {1: [6, 1, 3], 2: [7, 0, 4, 2, 5]}
SOURCE_SHARD = "20KB"  # small enough that decoder layers straddle shard files
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


# -- building checkpoints, plans and reading safetensors by hand -------------------------------------------------


def _decisive(model, layers, generator):
    """Large router rows (decisive routing) and experts whose output matters next to the residual stream."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parts = name.split(".")
            if parts[:2] == ["model", "layers"] and int(parts[2]) in layers and parts[3] == "mlp":
                std = 0.5 if name.endswith("mlp.gate.weight") else 0.2
                parameter.copy_(std * torch.randn(parameter.shape, generator=generator))


def save_deepseek(directory: Path, seed: int = 0, max_shard_size: str = SOURCE_SHARD, **overrides) -> Path:
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(DeepseekConfig(**{**TINY, **overrides})).eval()
    _decisive(model, MOE_LAYERS, torch.Generator().manual_seed(seed + 100))
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    return directory


def add_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["the cat sat on the mat and the dog sat on the log"],
                                  trainers.WordLevelTrainer(special_tokens=["<s>", "</s>", "<unk>", "<pad>"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(directory)
    (directory / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}\n")


def read_safetensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """{name: (dtype, shape, raw bytes)} parsed from the file format directly (no library)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header.pop("__metadata__", None)
    start = 8 + length
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        tensors[name] = (entry["dtype"], entry["shape"], data[start + begin : start + end])
    return tensors


def checkpoint_files(directory: Path) -> dict[str, dict[str, tuple[str, list[int], bytes]]]:
    return {path.name: read_safetensors(path) for path in sorted(directory.glob("*.safetensors"))}


def checkpoint_tensors(directory: Path) -> dict[str, tuple[str, list[int], bytes]]:
    tensors = {}
    for shard in checkpoint_files(directory).values():
        assert not tensors.keys() & shard.keys()
        tensors.update(shard)
    return tensors


def as_tensor(entry) -> torch.Tensor:
    dtype, shape, raw = entry
    assert dtype == "F32"
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(shape)


def tree_hashes(directory: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def identity(source: Path, family: str = "deepseek_moe", experts: int = 8, layers=MOE_LAYERS, top_k: int = 2) -> dict:
    config = json.loads((source / "config.json").read_text())
    top_k_key = detect_family(config).top_k_key
    return {"source": str(source), "family": family, "config_hash": config_hash(config, top_k_key),
            "moe_layers": list(layers),
            "experts_per_layer": {str(layer): experts for layer in layers}, "top_k": top_k}


def plan_data(source: Path, keep: dict, top_k: int, compensation: str = "none", **model) -> dict:
    family = json.loads((source / "config.json").read_text())["model_type"]
    base = identity(source, family="deepseek_v2" if family == "deepseek_v2" else "deepseek_moe")
    return {"format_version": 1, "model": {**base, **model}, "top_k": top_k, "compensation": compensation,
            "layers": {str(layer): {"keep": list(experts)} for layer, experts in keep.items()}}


def write_plan(path: Path, source: Path, keep: dict, top_k: int, compensation: str = "none", **model) -> Path:
    path.write_text(json.dumps(plan_data(source, keep, top_k, compensation, **model), indent=1))
    return path


def quiet(calibration=None, device="auto", batch_size=8, **changes) -> ExportOptions:
    """Options for an export without validation or progress bars (fitting on `calibration` when given)."""
    return ExportOptions(run=RunOptions(device=device, batch_size=batch_size, progress=False),
                         fit=FitOptions(calibration=calibration or {}),
                         validation=ExportValidation(enabled=False), **changes)


def leftovers(parent: Path) -> list[str]:
    """Hidden staging / scratch / retired directories the exporter may have left in OUT's parent."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# -- the independent reference: original weights, dropped experts masked at -inf ----------------------------------


def _swiglu(x, gate, up, down):
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def disk_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint by its on-disk name, read with safetensors itself."""
    from safetensors.torch import load_file

    return {name: t for shard in sorted(directory.glob("*.safetensors")) for name, t in load_file(shard).items()}


def _masked_deepseek_moe(sd, prefix, keep, top_k, renorm):
    """The MoE block at `prefix` from the original's on-disk (upstream, per-expert) tensors `sd`, with the
    dropped experts' router logits at -inf."""
    router = sd[prefix + "gate.weight"].float()
    experts = [tuple(sd[f"{prefix}experts.{e}.{p}_proj.weight"].float() for p in ("gate", "up", "down"))
               for e in range(router.shape[0])]
    shared = tuple(sd[f"{prefix}shared_experts.{p}_proj.weight"].float() for p in ("gate", "up", "down"))
    dropped = torch.ones(router.shape[0], dtype=torch.bool)
    dropped[list(keep)] = False

    def forward(hidden):
        x = hidden.reshape(-1, hidden.shape[-1])
        logits = (x.float() @ router.T).masked_fill(dropped, float("-inf"))
        weight, index = logits.softmax(-1).topk(top_k, dim=-1)
        if renorm:
            weight = weight / weight.sum(-1, keepdim=True)
        every = torch.stack([_swiglu(x, *w) for w in experts], 1)  # [T, E, H]: every expert on every token
        chosen = every.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
        return ((chosen * weight[..., None]).sum(1) + _swiglu(x, *shared)).view_as(hidden)

    return forward


def masked_reference(source: Path, kept: dict, top_k: int, ids: torch.Tensor, renorm: bool = False) -> torch.Tensor:
    """Logits of the original DeepSeekMoE with dropped experts' router logits at -inf and top-`top_k` routing."""
    model = DeepseekForCausalLM.from_pretrained(source).eval()
    sd = disk_tensors(source)
    for layer, keep in kept.items():
        assert f"model.layers.{layer}.mlp.experts.7.down_proj.weight" in sd  # 8 experts
        model.model.layers[layer].mlp.forward = _masked_deepseek_moe(sd, f"model.layers.{layer}.mlp.", keep, top_k,
                                                                     renorm)
    with torch.no_grad():
        return model(ids).logits


def original_logits(source: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return DeepseekForCausalLM.from_pretrained(source).eval()(ids).logits


def assert_matches_reference(got, expected, original):
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (original - expected).abs().max() > 1e-2, "the masking must matter for the test to mean anything"


# -- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny random upstream-format DeepSeekMoE (8 experts, top-2) whose layers straddle shard files."""
    directory = save_deepseek(tmp_path_factory.mktemp("src") / "model")
    add_tokenizer(directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    files_of_layer = {}
    for name, filename in index.items():
        if name.startswith("model.layers."):
            files_of_layer.setdefault(int(name.split(".")[2]), set()).add(filename)
    assert all(len(files_of_layer[layer]) >= 2 for layer in MOE_LAYERS), files_of_layer
    for name in TOKENIZER_FILES:
        assert (directory / name).is_file(), name
    return directory


@pytest.fixture(scope="module")
def source_hashes(source):
    return tree_hashes(source)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(2, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def export(source, tmp_path):
    """export(keep, top_k, **options) -> OUT, through the API, unvalidated."""

    def run(keep, top_k, name="out", **changes):
        plan = Plan.model_validate(plan_data(source, keep, top_k, changes.pop("compensation", "none")))
        out = tmp_path / name
        export_checkpoint(str(source), plan, out, quiet(**changes))
        return out

    return run


# -- 1. keep-all: byte-identical -----------------------------------------------------------------------------------


def test_keep_all_with_original_top_k_is_byte_identical(source, export, ids):
    shuffled = {1: [7, 3, 0, 1, 6, 2, 5, 4], 2: list(range(8))[::-1]}
    out = export(shuffled, top_k=2, max_shard_bytes=10**9)
    src, got = checkpoint_tensors(source), checkpoint_tensors(out)
    assert got.keys() == src.keys()
    for name, entry in src.items():
        assert got[name] == entry, name  # dtype, shape and every byte
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()

    config, new = (json.loads((d / "config.json").read_text()) for d in (source, out))
    assert "auto_map" not in config and new.pop("auto_map")
    assert new == config  # equivalent: same expert count, top-k, no per-layer counts
    with torch.no_grad():
        loaded = DeepseekForCausalLM.from_pretrained(out).eval()(ids).logits
    assert torch.equal(loaded, original_logits(source, ids))


# -- 2. `none` equals the masked original ---------------------------------------------------------------------------


@pytest.mark.parametrize("kept, top_k", [(UNIFORM, 1), (UNIFORM, 2), (NON_UNIFORM, 2)],
                         ids=["uniform-top1", "uniform-top2", "non-uniform-top2"])
def test_none_equals_original_with_dropped_experts_masked(source, export, ids, kept, top_k):
    from transformers import AutoModelForCausalLM

    out = export(kept, top_k)
    config = json.loads((out / "config.json").read_text())
    counts = {layer: len(experts) for layer, experts in kept.items()}
    assert config["num_experts_per_tok"] == top_k and config["norm_topk_prob"] is False
    assert config["n_routed_experts"] == max(counts.values())
    per_layer = {str(layer): n for layer, n in counts.items() if n != max(counts.values())}
    assert config.get("n_routed_experts_per_layer", {}) == per_layer

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model) is DeepseekForCausalLM  # our registered class, no remote code
    assert [model.model.layers[layer].mlp.experts.num_experts for layer in MOE_LAYERS] == [counts[1], counts[2]]
    with torch.no_grad():
        got = model(ids).logits
    assert_matches_reference(got, masked_reference(source, kept, top_k, ids), original_logits(source, ids))


_ISOLATED = r"""
import importlib.abc, json, sys
sys.path[:0] = json.loads(sys.argv[1])  # the environment's site-packages only: no .pth files, no repository


class NoCompressor(importlib.abc.MetaPathFinder):  # as on a machine without moe-compress, however it is installed
    def find_spec(self, name, path=None, target=None):
        if name == "compressor" or name.startswith("compressor."):
            raise ImportError(f"No module named {name!r}")


sys.meta_path.insert(0, NoCompressor())
try:
    import compressor
    importable = True
except ImportError:
    importable = False
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
for job in json.loads(open(sys.argv[2]).read()):
    model = AutoModelForCausalLM.from_pretrained(job["model"], trust_remote_code=job["trust_remote_code"]).eval()
    with torch.no_grad():
        logits = model(torch.load(job["inputs"])).logits
    torch.save({"logits": logits, "class": type(model).__module__ + "." + type(model).__name__,
                "compressor_importable": importable, "compressor_loaded": "compressor" in sys.modules}, job["result"])
"""


def run_isolated(tmp_path: Path, jobs: list[dict], ids: torch.Tensor) -> list[dict]:
    """Load each job's model in a fresh `python -I -S` where `compressor` cannot be imported; returns the results."""
    work = tmp_path / "isolated"
    work.mkdir()
    torch.save(ids, work / "ids.pt")
    for i, job in enumerate(jobs):
        job.update(inputs=str(work / "ids.pt"), result=str(work / f"result-{i}.pt"))
    (work / "jobs.json").write_text(json.dumps(jobs))
    (work / "load.py").write_text(_ISOLATED)
    site = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HOME=str(work / "hf_home"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    result = subprocess.run([sys.executable, "-I", "-S", str(work / "load.py"), json.dumps(site),
                             str(work / "jobs.json")], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(job["result"]) for job in jobs]


@pytest.mark.slow
def test_trust_remote_code_loads_without_the_package(source, export, ids, tmp_path):
    outs = {"uniform": export(UNIFORM, 1, name="uniform"), "non_uniform": export(NON_UNIFORM, 2, name="non_uniform")}
    results = run_isolated(tmp_path, [{"model": str(out), "trust_remote_code": True} for out in outs.values()], ids)
    original = original_logits(source, ids)
    for (kept, top_k), result in zip([(UNIFORM, 1), (NON_UNIFORM, 2)], results):
        assert result["compressor_importable"] is False and result["compressor_loaded"] is False
        assert result["class"].startswith("transformers_modules.") and result["class"].endswith(".DeepseekForCausalLM")
        assert_matches_reference(result["logits"], masked_reference(source, kept, top_k, ids), original)


def test_pruning_an_export_again_composes_the_masks(source, export, ids, tmp_path):
    """A non-uniform output is a valid source: pruning it again equals masking the union of dropped experts."""
    first = export(NON_UNIFORM, 2, name="first")
    plan = plan_data(first, {1: [0, 2], 2: [4, 1, 3]}, 1)
    plan["model"]["experts_per_layer"] = {"1": 3, "2": 5}
    export_checkpoint(str(first), Plan.model_validate(plan), tmp_path / "second", quiet())
    config = json.loads((tmp_path / "second" / "config.json").read_text())
    assert (config["n_routed_experts"], config["num_experts_per_tok"]) == (3, 1)
    assert config.get("n_routed_experts_per_layer", {}) == {"1": 2}
    with torch.no_grad():
        got = DeepseekForCausalLM.from_pretrained(tmp_path / "second").eval()(ids).logits
    # first kept [1, 3, 6] and [0, 2, 4, 5, 7]; the second plan keeps new ids 0, 2 and 1, 3, 4 of those
    composed = {1: [1, 6], 2: [2, 5, 7]}
    assert_matches_reference(got, masked_reference(source, composed, 1, ids), original_logits(source, ids))


# -- 3. renumbering and router rows ---------------------------------------------------------------------------------


def test_kept_experts_are_renumbered_in_original_order_and_router_rows_sliced(source, export):
    out = export(NON_UNIFORM, 2)
    src, got = checkpoint_tensors(source), checkpoint_tensors(out)
    for layer, keep in NON_UNIFORM.items():
        order = sorted(keep)
        prefix = f"model.layers.{layer}.mlp."
        experts = {int(name.split(".")[5]) for name in got if name.startswith(prefix + "experts.")}
        assert experts == set(range(len(keep)))
        for new, old in enumerate(order):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert got[f"{prefix}experts.{new}.{proj}.weight"] == src[f"{prefix}experts.{old}.{proj}.weight"]
        router = as_tensor(got[prefix + "gate.weight"])
        assert router.shape == (len(keep), TINY["hidden_size"])
        assert torch.equal(router, as_tensor(src[prefix + "gate.weight"])[order])
    # Everything that is not a routed expert or a router is copied unchanged.
    untouched = [n for n in src if ".mlp.experts." not in n and not n.endswith("mlp.gate.weight")]
    assert len(untouched) > 10 and all(got[name] == src[name] for name in untouched)
    dropped = sum(8 - len(keep) for keep in NON_UNIFORM.values()) * 3
    assert len(got) == len(src) - dropped


# -- 4. shards: straddling source, small output shards ---------------------------------------------------------------


def test_small_max_shard_size_writes_shards_and_a_correct_index(source, tmp_path, ids, capsys):
    plan = write_plan(tmp_path / "plan.json", source, UNIFORM, 1)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["export", source, plan, "-o", out, "--max-shard-size", "30KB", "--no-validate"], capsys)
    assert code == 0, err
    files = checkpoint_files(out)
    assert len(files) >= 3
    assert sorted(files) == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    for shard in files.values():  # no shard over the limit unless a single tensor is larger
        assert sum(len(t[2]) for t in shard.values()) <= 30_000 or len(shard) == 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {name: file for file, shard in files.items() for name in shard}
    assert index["metadata"]["total_size"] == sum(len(t[2]) for shard in files.values() for t in shard.values())

    model = DeepseekForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = model(ids).logits
    assert_matches_reference(got, masked_reference(source, UNIFORM, 1, ids), original_logits(source, ids))


def test_single_file_source_exports_the_same_tensors_as_a_sharded_one(source, tmp_path):
    single = save_deepseek(tmp_path / "single", max_shard_size="1GB")
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()
    assert checkpoint_tensors(single) == checkpoint_tensors(source)  # same weights, other file layout
    outs = []
    for directory, name in ((single, "a"), (source, "b")):
        plan = Plan.model_validate(plan_data(directory, UNIFORM, 1))
        export_checkpoint(str(directory), plan, tmp_path / name, quiet())
        outs.append(checkpoint_tensors(tmp_path / name))
    assert outs[0] == outs[1]


# -- 5. what OUT contains -------------------------------------------------------------------------------------------


def test_output_carries_tokenizer_plan_provenance_card_and_modeling_code(source, tmp_path, capsys):
    from huggingface_hub import ModelCard

    plan_path = write_plan(tmp_path / "plan.json", source, NON_UNIFORM, 2)
    out = tmp_path / "pruned"
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    code, stdout, err = run_cli(["export", source, plan_path, "-o", out, "--no-validate"], capsys)
    assert code == 0, err
    assert "non-uniform plan" in stdout and "vLLM serves it with moe-compress's vLLM plugin" in stdout

    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    here = Path(compressor.__file__).parent / "modeling"
    for name in ("configuration_deepseek.py", "modeling_deepseek.py"):
        assert (out / name).read_bytes() == (here / name).read_bytes()
    assert json.loads((out / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    }

    plan = Plan.load(plan_path)
    assert Plan.load(out / "compression_plan.json") == plan
    provenance = json.loads((out / "moe_compress_provenance.json").read_text())
    assert provenance["tool_version"] == compressor.__version__
    assert provenance["source_model"] == str(source) and provenance["source_revision"] is None
    assert provenance["plan_hash"] == plan.content_hash() == Plan.load(out / "compression_plan.json").content_hash()
    assert provenance["compensation"] == "none"
    assert datetime.datetime.fromisoformat(provenance["created"]) >= before
    tensors = checkpoint_tensors(out)
    assert provenance["tensors"] == len(tensors) and provenance["bytes"] == sum(len(t[2]) for t in tensors.values())
    model_parameters = sum(p.numel() for p in DeepseekForCausalLM.from_pretrained(out).parameters())
    source_parameters = sum(p.numel() for p in DeepseekForCausalLM.from_pretrained(source).parameters())
    assert provenance["parameters"] == model_parameters < provenance["source_parameters"] == source_parameters

    card = ModelCard.load(out / "README.md")
    assert "moe-compress" in card.data.tags and card.data.library_name == "transformers"
    assert str(source) in card.text and "top-2" in card.text and "`none`" in card.text
    rows = {line.split("|")[1].strip(): line for line in card.text.splitlines() if line.startswith(("| 1 ", "| 2 "))}
    assert "3 / 8" in rows["1"] and "1, 3, 6" in rows["1"]
    assert "5 / 8" in rows["2"] and "0, 2, 4, 5, 7" in rows["2"]
    assert "trust_remote_code=True" in card.text
    # per-layer counts: vLLM serves it through moe-compress's plugin, which the card says how to install
    assert "`DeepseekForCausalLMPerLayer`" in card.text and "scripts/setup_vllm.sh" in card.text
    assert f"`vllm serve {out} --trust-remote-code`" in card.text
    assert "vLLM and plain transformers need the same" not in card.text
    assert f"{model_parameters / 1e6:.2f}M parameters (was " in card.text and f"{source_parameters / 1e6:.2f}M)" in card.text


# -- 6. atomicity and safety ----------------------------------------------------------------------------------------


def test_existing_output_needs_overwrite(source, tmp_path, capsys):
    plan = write_plan(tmp_path / "plan.json", source, UNIFORM, 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep-me.txt").write_text("mine\n")
    code, _, err = run_cli(["export", source, plan, "-o", out, "--no-validate"], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep-me.txt"]
    assert leftovers(tmp_path) == []

    code, _, err = run_cli(["export", source, plan, "-o", out, "--no-validate", "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "keep-me.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_output_may_not_be_or_contain_or_sit_inside_the_source(source, source_hashes, tmp_path, capsys):
    plan = write_plan(tmp_path / "plan.json", source, UNIFORM, 1)
    link = tmp_path / "link"
    link.symlink_to(source, target_is_directory=True)
    for out in (source, source / "pruned", link, link / "pruned", source.parent):
        code, _, err = run_cli(["export", source, plan, "-o", out, "--no-validate", "--overwrite"], capsys)
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (out, err)
        assert "source" in err
    assert not (source / "pruned").exists()
    assert tree_hashes(source) == source_hashes
    assert leftovers(source.parent) == [] and leftovers(tmp_path) == []


def test_source_is_only_read(source, source_hashes, export):
    export(UNIFORM, 1, name="a")
    export(NON_UNIFORM, 2, name="b", max_shard_bytes=20_000)
    export(UNIFORM, 1, name="a", overwrite=True)
    assert tree_hashes(source) == source_hashes


class _Fail:
    """Replaces ShardWriter.write_range: let `after` calls through, then raise `error`."""

    def __init__(self, original, after, error):
        self.original, self.after, self.error, self.calls = original, after, error, 0

    def __get__(self, instance, owner):
        return lambda *args, **kwargs: self(instance, *args, **kwargs)

    def __call__(self, instance, *args, **kwargs):
        self.calls += 1
        if self.calls > self.after:
            raise self.error
        return self.original(instance, *args, **kwargs)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "interrupted"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_failure_midway_leaves_no_output_and_no_temporary_files(source, source_hashes, tmp_path, monkeypatch,
                                                                error, existing):
    from compressor.io.writer import ShardWriter

    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "previous.txt").write_text("previous export\n")
    failing = _Fail(ShardWriter.write_range, after=40, error=error)
    monkeypatch.setattr(ShardWriter, "write_range", failing)
    plan = Plan.model_validate(plan_data(source, UNIFORM, 1))
    expected = UserError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as raised:
        export_checkpoint(str(source), plan, out, quiet(max_shard_bytes=20_000, overwrite=existing))
    assert failing.calls == 41  # it did fail midway: shards were already complete
    if expected is UserError:
        assert "No space left on device" in str(raised.value) and "\n" not in str(raised.value)
    if existing:
        assert [p.name for p in out.iterdir()] == ["previous.txt"]
    else:
        assert not out.exists()
    assert leftovers(tmp_path) == []
    assert tree_hashes(source) == source_hashes


def test_failed_fit_leaves_no_output_and_no_scratch(source, tmp_path, monkeypatch, calibration):
    import compressor.export.compensation as compensation

    calls = []
    original = compensation._fit_layer

    def fit_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("fit failed")
        return original(*args, **kwargs)

    monkeypatch.setattr(compensation, "_fit_layer", fit_then_fail)
    plan = Plan.model_validate(plan_data(source, UNIFORM, 1))
    with pytest.raises(RuntimeError, match="fit failed"):
        export_checkpoint(str(source), plan, tmp_path / "out",
                          quiet(compensation="scale", calibration={"c": str(calibration)}, device="cpu"))
    assert len(calls) == 2 and not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# -- 7. bad input through the CLI -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corrupt_source(tmp_path_factory, source) -> Path:
    """A copy of the source with one shard truncated."""
    directory = tmp_path_factory.mktemp("corrupt") / "model"
    directory.mkdir()
    for path in source.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    shard = directory / index["model.layers.1.mlp.experts.7.down_proj.weight"]
    shard.write_bytes(shard.read_bytes()[:-100])
    return directory


BAD_PLANS = {
    "expert-count": (dict(model=dict(experts_per_layer={"1": 16, "2": 16}), keep=UNIFORM), "expert count differs"),
    "config-hash": (dict(model=dict(config_hash="0" * 64), keep=UNIFORM), "config hash differs"),
    "layers": (dict(model=dict(moe_layers=[1, 2, 3], experts_per_layer={"1": 8, "2": 8, "3": 8}),
                    keep={**UNIFORM, 3: [0, 1]}), "MoE layers differ"),
    "family": (dict(model=dict(family="deepseek_v2"), keep=UNIFORM), "family differs"),
    "out-of-range": (dict(keep={1: [0, 8], 2: [1, 2]}), "there is no expert 8"),
    "negative": (dict(keep={1: [0, -1], 2: [1, 2]}), "there is no expert -1"),
    "duplicate": (dict(keep={1: [3, 3], 2: [1, 2]}), "lists expert 3 twice"),
    "empty": (dict(keep={1: [], 2: [1, 2]}), "keeps no experts"),
    "missing-layer": (dict(keep={1: [0, 1]}), "no entry for MoE layers 2"),
    "top-k": (dict(keep={1: [0, 1, 2], 2: [1, 2]}, top_k=3), "top_k=3 exceeds"),
    "fit-without-data": (dict(keep=UNIFORM, compensation="refit"), "--calibration"),
}


@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_bad_plan_is_one_error_line_exit_2_and_no_output(source, source_hashes, tmp_path, capsys, case):
    spec, message = BAD_PLANS[case]
    data = plan_data(source, spec["keep"], spec.get("top_k", 1), spec.get("compensation", "none"),
                     **spec.get("model", {}))
    (tmp_path / "plan.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    code, stdout, err = run_cli(["export", source, tmp_path / "plan.json", "-o", out, "--no-validate"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
    assert tree_hashes(source) == source_hashes


def test_corrupt_source_shard_is_one_error_line_exit_2_and_no_output(source, corrupt_source, tmp_path, capsys):
    before = tree_hashes(corrupt_source)
    plan = write_plan(tmp_path / "plan.json", source, UNIFORM, 1)
    out = tmp_path / "out"
    code, _, err = run_cli(["export", corrupt_source, plan, "-o", out, "--no-validate"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    shard = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.1.mlp.experts.7.down_proj.weight"]
    assert "corrupt" in lines[0] and shard in lines[0] and "truncated" in lines[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
    assert tree_hashes(corrupt_source) == before


@pytest.mark.slow
def test_bad_input_exit_code_from_a_real_process(source, corrupt_source, tmp_path):
    plan = write_plan(tmp_path / "plan.json", source, UNIFORM, 1)
    result = subprocess.run([sys.executable, "-m", "compressor", "export", str(corrupt_source), str(plan), "-o",
                             str(tmp_path / "out"), "--no-validate"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("error: corrupt safetensors shard") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_plan_and_bad_shard_size_are_one_line_errors(source, tmp_path, capsys):
    plan = write_plan(tmp_path / "plan.json", source, UNIFORM, 1)
    for args, message in ((["-o", tmp_path / "out"], "does not exist"),
                          (["-o", tmp_path / "out", "--max-shard-size", "lots"], "cannot read size")):
        plan_arg = tmp_path / "missing.json" if message == "does not exist" else plan
        code, _, err = run_cli(["export", source, plan_arg, *args, "--no-validate"], capsys)
        assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()


# -- 8. compensation ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    rng = random.Random(5)
    rows = [[rng.randrange(2, TINY["vocab_size"]) for _ in range(24)] for _ in range(32)]
    return write_jsonl(tmp_path_factory.mktemp("calibration") / "rows.jsonl", rows)


FITTED = {"scale": [], "refit": [], "distill": ["--distill-steps", "20"],
          "distill-router": ["--distill-steps", "20", "--distill-router"],
          "distill-e2e": ["--distill-steps", "20", "--distill-e2e-steps", "30", "--distill-e2e-lr", "1e-3"]}


@pytest.fixture(scope="module")
def compensated(tmp_path_factory, source, calibration) -> dict[str, Path]:
    """{mode: OUT} for the uniform top-1 plan, every compensation mode, exported through the CLI."""
    from compressor.cli import main

    root = tmp_path_factory.mktemp("compensated")
    plan = write_plan(root / "plan.json", source, UNIFORM, 1, compensation="distill")
    outs = {}
    for mode in ("none", "renorm", *FITTED):
        extra = FITTED.get(mode, [])
        if mode in FITTED:
            extra = [*extra, "--calibration", f"c={calibration}", "--seq-len", "32", "--device", "cpu"]
        outs[mode] = root / mode
        try:
            main(["export", str(source), str(plan), "-o", str(outs[mode]), "--no-validate",
                  "--compensation", mode.split("-")[0], *extra])
        except SystemExit as done:
            assert done.code == 0, mode
    return outs


def layer_outputs(directory: Path, ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Every decoder layer's output (forward hooks) and the logits."""
    model = DeepseekForCausalLM.from_pretrained(directory).eval()
    captured = {}
    for layer, module in enumerate(model.model.layers):
        module.register_forward_hook(lambda m, args, output, layer=layer: captured.__setitem__(layer, output))
    with torch.no_grad():
        logits = model(ids).logits
    return captured, logits


def relative_error(got: torch.Tensor, target: torch.Tensor) -> float:
    return float((got - target).double().pow(2).sum() / target.double().pow(2).sum())


@pytest.mark.parametrize("mode", list(FITTED))
def test_fitted_compensation_beats_none_on_the_calibration_data(source, compensated, calibration, mode):
    rows = [json.loads(line)["input_ids"] for line in calibration.read_text().splitlines()]
    ids = torch.tensor(rows)
    target, target_logits = layer_outputs(source, ids)  # the original model, top-2 over all experts
    none, none_logits = layer_outputs(compensated["none"], ids)
    fitted, fitted_logits = layer_outputs(compensated[mode], ids)
    assert torch.equal(none[0], target[0])
    assert torch.equal(fitted[0], target[0]) is (mode != "distill-e2e")  # only end to end trains the dense MLP
    # scale fits one number per expert: the weakest mode, so the least gain is asked of it
    gain = 0.95 if mode == "scale" else 0.9
    for layer in MOE_LAYERS:
        before, after = relative_error(none[layer], target[layer]), relative_error(fitted[layer], target[layer])
        assert before > 0.01 and after < gain * before, (layer, before, after)
    assert relative_error(fitted_logits, target_logits) < gain * relative_error(none_logits, target_logits)

    provenance = json.loads((compensated[mode] / "moe_compress_provenance.json").read_text())
    assert provenance["compensation"] == mode.split("-")[0]
    assert provenance["calibration"] == {"c": str(calibration)}
    assert sorted(provenance["fit"]["layers"]) == ["1", "2"]
    assert provenance["fit"]["calibration_tokens"] == ids.numel()


def _changed(a: dict, b: dict) -> set[str]:
    assert a.keys() == b.keys()
    return {name for name in a if a[name] != b[name]}


def test_scale_multiplies_each_kept_down_proj_by_one_number(compensated):
    none, scaled = checkpoint_tensors(compensated["none"]), checkpoint_tensors(compensated["scale"])
    changed = _changed(none, scaled)
    assert changed and all(name.endswith(".down_proj.weight") and ".mlp.experts." in name for name in changed)
    factors = []
    for name in changed:
        old, new = as_tensor(none[name]), as_tensor(scaled[name])
        factor = float((new * old).sum() / (old * old).sum())
        torch.testing.assert_close(new, factor * old, rtol=1e-5, atol=1e-7)
        factors.append(factor)
    assert max(abs(f - 1) for f in factors) > 0.01


def test_refit_changes_only_the_kept_experts_down_proj(compensated):
    none, refit = checkpoint_tensors(compensated["none"]), checkpoint_tensors(compensated["refit"])
    changed = _changed(none, refit)
    assert changed and all(name.endswith(".down_proj.weight") and ".mlp.experts." in name for name in changed)
    rescaled = []
    for name in changed:
        old, new = as_tensor(none[name]), as_tensor(refit[name])
        factor = float((new * old).sum() / (old * old).sum())
        rescaled.append(torch.allclose(new, factor * old, rtol=1e-3, atol=1e-6))
    assert not all(rescaled)  # a real refit of the matrices, not one number each


@pytest.mark.parametrize("mode, router", [("distill", False), ("distill-router", True), ("distill-e2e", False)])
def test_distill_trains_experts_and_shared_experts_only(compensated, mode, router):
    none, distilled = checkpoint_tensors(compensated["none"]), checkpoint_tensors(compensated[mode])
    changed = _changed(none, distilled)
    routers = {n for n in none if n.endswith("mlp.gate.weight")}
    trainable = {n for n in none if ".mlp.experts." in n or ".mlp.shared_experts." in n}
    trainable |= routers if router else set()
    if mode == "distill-e2e":  # end-to-end distillation trains the dense layer's MLP too
        trainable |= {n for n in none if n.startswith("model.layers.0.mlp.")}
    assert changed <= trainable
    assert any(".mlp.experts." in n for n in changed) and any(".mlp.shared_experts." in n for n in changed)
    assert bool(changed & routers) is router


def kl_to_original(source: Path, directory: Path, ids: torch.Tensor) -> float:
    """Mean KL(original || model at `directory`) of next-token distributions over every position of `ids`."""
    _, target = layer_outputs(source, ids)
    _, got = layer_outputs(directory, ids)
    target, got = target.log_softmax(-1), got.log_softmax(-1)
    return float((target.exp() * (target - got)).sum(-1).mean())


def test_end_to_end_distillation_lowers_the_kl_left_by_layerwise_distillation(source, compensated, calibration):
    rows = [json.loads(line)["input_ids"] for line in calibration.read_text().splitlines()]
    ids = torch.tensor(rows)
    layerwise, end_to_end = (kl_to_original(source, compensated[m], ids) for m in ("distill", "distill-e2e"))
    assert end_to_end < 0.8 * layerwise, (layerwise, end_to_end)
    changed = _changed(checkpoint_tensors(compensated["distill"]), checkpoint_tensors(compensated["distill-e2e"]))
    assert any(".mlp.experts." in n for n in changed) and any(".mlp.shared_experts." in n for n in changed)
    fit = json.loads((compensated["distill-e2e"] / "moe_compress_provenance.json").read_text())["fit"]
    assert fit["end_to_end"]["steps"] == 30 and fit["end_to_end"]["kl_last"] < fit["end_to_end"]["kl_first"]
    assert "end_to_end" not in json.loads((compensated["distill"] / "moe_compress_provenance.json").read_text())["fit"]
    card = (compensated["distill-e2e"] / "README.md").read_text()
    assert f"compensation: `distill` (fitted layer by layer on {fit['calibration_tokens']:,} calibration tokens, " \
           "then 30 end-to-end steps)" in card


def test_end_to_end_distillation_refuses_other_modes_and_a_device_too_small(source, tmp_path, calibration,
                                                                           monkeypatch, capsys):
    plan = write_plan(tmp_path / "plan.json", source, UNIFORM, 1)
    code, _, err = run_cli(["export", source, plan, "-o", tmp_path / "out", "--no-validate", "--compensation",
                            "refit", "--calibration", f"c={calibration}", "--distill-e2e-steps", "5"], capsys)
    assert code == 2 and "apply to --compensation distill, not refit" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()

    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=2**20))
    code, _, err = run_cli(["export", source, plan, "-o", tmp_path / "out", "--no-validate", "--compensation",
                            "distill", "--calibration", f"c={calibration}", "--device", "cpu",
                            "--distill-e2e-steps", "5"], capsys)
    assert code == 2 and "holds the original and the pruned model whole" in err and "0.0 GiB is free" in err
    assert not (tmp_path / "out").exists()


def test_fitted_non_uniform_plan_with_padded_calibration_rows(source, tmp_path):
    """Rows of different lengths (padded batches), a non-uniform plan: refit still beats none on every MoE layer."""
    rng = random.Random(11)
    rows = [[rng.randrange(2, TINY["vocab_size"]) for _ in range(rng.randint(8, 24))] for _ in range(24)]
    calibration = write_jsonl(tmp_path / "rows.jsonl", rows)
    plan = Plan.model_validate(plan_data(source, NON_UNIFORM, 1))
    for mode in ("none", "refit"):
        export_checkpoint(str(source), plan, tmp_path / mode,
                          quiet(compensation=mode, calibration={"c": str(calibration)}, device="cpu", batch_size=5))
    ids = torch.tensor([row[:8] for row in rows])  # causal: the first 8 positions of every row, unpadded
    target, _ = layer_outputs(source, ids)
    none, _ = layer_outputs(tmp_path / "none", ids)
    refit, _ = layer_outputs(tmp_path / "refit", ids)
    for layer in MOE_LAYERS:
        before, after = relative_error(none[layer], target[layer]), relative_error(refit[layer], target[layer])
        assert after < 0.9 * before, (layer, before, after)
    fit = json.loads((tmp_path / "refit" / "moe_compress_provenance.json").read_text())["fit"]
    assert fit["calibration_tokens"] == sum(len(row) for row in rows)


def test_renorm_makes_the_top1_weight_one(source, compensated, calibration):
    config = json.loads((compensated["renorm"] / "config.json").read_text())
    assert config["norm_topk_prob"] is True and config["num_experts_per_tok"] == 1
    assert json.loads((compensated["none"] / "config.json").read_text())["norm_topk_prob"] is False
    assert checkpoint_tensors(compensated["renorm"]) == checkpoint_tensors(compensated["none"])
    ids = torch.tensor([json.loads(line)["input_ids"] for line in calibration.read_text().splitlines()[:4]])
    with torch.no_grad():
        got = DeepseekForCausalLM.from_pretrained(compensated["renorm"]).eval()(ids).logits
    expected = masked_reference(source, UNIFORM, 1, ids, renorm=True)  # output = best kept expert + shared
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (masked_reference(source, UNIFORM, 1, ids) - expected).abs().max() > 1e-2


# -- 9. DeepSeek-V2: native output ----------------------------------------------------------------------------------


def save_v2(directory: Path, **overrides) -> Path:
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(DeepseekV2Config(**{**V2_TINY, **overrides})).eval()
    _decisive(model, MOE_LAYERS, torch.Generator().manual_seed(7))
    model.save_pretrained(directory, max_shard_size="12KB")
    names = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names  # per-expert tensors on disk
    return directory


def masked_v2_reference(source: Path, kept: dict, top_k: int, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the original DeepSeek-V2 with dropped experts' router logits at -inf and top-`top_k` routing
    (within the best groups when the router is grouped), scaled by routed_scaling_factor."""
    from transformers import DeepseekV2ForCausalLM

    model = DeepseekV2ForCausalLM.from_pretrained(source).eval()
    config = model.config
    for layer, keep in kept.items():
        block = model.model.layers[layer].mlp
        router = block.gate.weight.detach().float()
        count, inter = router.shape[0], config.moe_intermediate_size
        experts = [(block.experts.gate_up_proj[e, :inter].detach(), block.experts.gate_up_proj[e, inter:].detach(),
                    block.experts.down_proj[e].detach()) for e in range(count)]
        shared = block.shared_experts
        dropped = torch.ones(count, dtype=torch.bool)
        dropped[list(keep)] = False

        def forward(hidden, router=router, experts=experts, shared=shared, dropped=dropped):
            x = hidden.reshape(-1, hidden.shape[-1])
            scores = (x.float() @ router.T).masked_fill(dropped, float("-inf")).softmax(-1)
            if config.topk_method == "group_limited_greedy":
                groups = scores.view(x.shape[0], config.n_group, -1).max(-1).values
                best = groups.topk(config.topk_group, dim=-1).indices
                allowed = torch.zeros_like(groups, dtype=torch.bool).scatter(1, best, True)
                scores = scores.masked_fill(~allowed.repeat_interleave(count // config.n_group, 1), 0.0)
            weight, index = scores.topk(top_k, dim=-1)
            weight = weight * config.routed_scaling_factor
            every = torch.stack([_swiglu(x, *w) for w in experts], 1)
            chosen = every.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
            return ((chosen * weight[..., None]).sum(1) + shared(x)).view_as(hidden)

        block.forward = forward
    with torch.no_grad():
        return model(ids).logits


V2_CASES = {
    # 2 groups of 4, tokens pick within the best group: keep 2 per group, in group order
    "grouped": ({"n_group": 2, "topk_group": 1}, {1: [1, 2, 5, 6], 2: [0, 3, 4, 7]}, 2),
    "greedy": ({"topk_method": "greedy", "n_group": 1, "topk_group": 1}, {1: [0, 2, 3, 7], 2: [1, 4, 5, 6]}, 1),
}


@pytest.mark.slow
def test_deepseek_v2_output_loads_in_plain_transformers_and_equals_the_masked_original(tmp_path, ids):
    from transformers import DeepseekV2ForCausalLM

    jobs, expected = [], []
    for name, (overrides, kept, top_k) in V2_CASES.items():
        source = save_v2(tmp_path / f"v2-{name}", **overrides)
        out = tmp_path / f"out-{name}"
        export_checkpoint(str(source), Plan.model_validate(plan_data(source, kept, top_k)), out,
                          quiet(max_shard_bytes=20_000))
        config = json.loads((out / "config.json").read_text())
        source_config = json.loads((source / "config.json").read_text())
        assert "auto_map" not in config and not list(out.glob("*.py"))
        assert (config["n_routed_experts"], config["num_experts_per_tok"]) == (4, top_k)
        assert {k: v for k, v in config.items() if k not in ("n_routed_experts", "num_experts_per_tok")} == \
            {k: v for k, v in source_config.items() if k not in ("n_routed_experts", "num_experts_per_tok")}
        assert len(list(out.glob("model-*.safetensors"))) > 1
        card = (out / "README.md").read_text()  # plain transformers: no moe-compress, no remote code to suggest
        assert "import compressor" not in card and "trust_remote_code" not in card
        with torch.no_grad():
            in_process = DeepseekV2ForCausalLM.from_pretrained(out).eval()(ids).logits
        reference = masked_v2_reference(source, kept, top_k, ids)
        with torch.no_grad():
            original = DeepseekV2ForCausalLM.from_pretrained(source).eval()(ids).logits
        assert_matches_reference(in_process, reference, original)
        jobs.append({"model": str(out), "trust_remote_code": False})
        expected.append(reference)
    for result, reference in zip(run_isolated(tmp_path, jobs, ids), expected):
        assert result["compressor_importable"] is False
        assert result["class"] == "transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2ForCausalLM"
        torch.testing.assert_close(result["logits"], reference, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def v2_source(tmp_path_factory) -> Path:
    return save_v2(tmp_path_factory.mktemp("v2") / "model")


@pytest.mark.parametrize("keep, top_k, compensation, message", [
    ({1: [1, 2, 5, 6], 2: [0, 3, 4]}, 1, "none", "every layer must keep the same number of groups"),
    ({1: [1, 2, 5, 6], 2: [0, 3, 4, 7]}, 1, "renorm", "cannot be expressed for DeepSeek-V2"),
    ({1: [0, 1, 2, 4], 2: [0, 3, 4, 7]}, 1, "none", "every group keeps the same number"),
], ids=["groups-of-unequal-size", "renorm", "unbalanced-groups"])
def test_deepseek_v2_plans_it_cannot_express_are_refused(v2_source, tmp_path, capsys, keep, top_k, compensation,
                                                         message):
    plan = write_plan(tmp_path / "plan.json", v2_source, keep, top_k, compensation)
    code, _, err = run_cli(["export", v2_source, plan, "-o", tmp_path / "out", "--no-validate"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
