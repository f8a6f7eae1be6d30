"""Hostile input over every command: each case must exit 2 with exactly one stderr line starting with `error:`,
print no traceback, leave no output (no new file anywhere, no staging sibling) and leave every input
byte-identical.

The world (a tiny checkpoint, a profile, a plan, an export, data files, a recipe) is built once; a case may add
files of its own under its tmp_path before the snapshot is taken.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from safetensors.torch import load_file, save_file

from helpers import TINY, run_cli, save_tiny_checkpoint, stage_options, write_jsonl


@dataclass
class World:
    root: Path
    model: Path
    other: Path
    data: Path
    profile: Path
    plan: Path
    out: Path
    afile: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    import random

    from compressor.export.exporter import ExportOptions, ExportValidation, RunOptions, export_checkpoint
    from compressor.planning import PlanOptions, make_plan
    from compressor.profiling import ProfileOptions, profile_model

    root = tmp_path_factory.mktemp("world")
    model = save_tiny_checkpoint(root / "model")
    other = save_tiny_checkpoint(root / "other", n_routed_experts=6)
    rng = random.Random(0)
    data = write_jsonl(root / "data.jsonl", [[rng.randrange(2, TINY["vocab_size"]) for _ in range(12)]
                                             for _ in range(8)])
    profile = profile_model(str(model), {"code": str(data)},
                            stage_options(ProfileOptions, seq_len=16, batch_size=4, device="cpu", progress=False))
    profile.save(root / "profile.json")
    plan = make_plan(profile, PlanOptions(keep=4, top_k=1, compensation="none"))
    plan.save(root / "plan.json")
    export_checkpoint(str(model), plan, root / "out", ExportOptions(run=RunOptions(device="cpu", progress=False), validation=ExportValidation(enabled=False)))
    (root / "afile").write_text("a regular file\n")
    return World(root, model, other, data, root / "profile.json", root / "plan.json", root / "out", root / "afile")


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every path under `roots` with a digest of its content ('dir' for folders)."""
    state = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            state[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


# -- case builders -----------------------------------------------------------------------------------------


def _copy_model(w: World, tmp: Path, name: str = "variant") -> Path:
    import shutil

    target = tmp / name
    shutil.copytree(w.model, target)
    return target


def _edit_config(w: World, tmp: Path, **changes) -> Path:
    target = _copy_model(w, tmp)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def _edit_tensors(w: World, tmp: Path, edit: Callable[[dict], None]) -> Path:
    target = _copy_model(w, tmp)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _edit_json(source: Path, tmp: Path, name: str, edit: Callable[[dict], None] | None = None, raw: str | None = None):
    target = tmp / name
    if raw is not None:
        target.write_text(raw)
        return target
    data = json.loads(source.read_text())
    edit(data)
    target.write_text(json.dumps(data))
    return target


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _recipe(w: World, tmp: Path, **changes) -> Path:
    import yaml

    recipe = {"model": str(w.model), "work_dir": str(tmp / "work"), "device": "cpu",
              "profile": {"domains": {"code": str(w.data)}, "seq_len": 16, "max_tokens": 64},
              "plan": {"keep": 4, "top_k": 1}, "export": {"compensation": "none"}}
    for dotted, value in changes.items():
        node = recipe
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _per_layer_output(w: World, tmp: Path) -> Path:
    import shutil

    target = tmp / "per-layer"
    shutil.copytree(w.out, target)
    config = json.loads((target / "config.json").read_text())
    config["n_routed_experts_per_layer"] = {"1": 3}
    (target / "config.json").write_text(json.dumps(config))
    return target


def _profile_with(w: World, tmp: Path, edit: Callable[[dict], None]) -> Path:
    return _edit_json(w.profile, tmp, "edited-profile.json", edit)


def _zero_domain(data: dict) -> None:
    for layer in data["domains"]["code"]["layers"].values():
        for key in ("selected", "top1", "gate_mass", "reap"):
            layer[key] = [0] * len(layer[key])
    data["domains"]["code"]["tokens"] = 0


def _nan_profile(w: World, tmp: Path) -> Path:
    text = w.profile.read_text()
    data = json.loads(text)
    first = next(iter(data["domains"]["code"]["layers"].values()))
    first["gate_mass"][0] = "NaN-marker"
    return _write(tmp, "nan-profile.json", json.dumps(data).replace('"NaN-marker"', "NaN"))


def _other_profile(w: World, tmp: Path) -> Path:
    from compressor.profiling import ProfileOptions, profile_model

    path = tmp / "other-profile.json"
    profile_model(str(w.other), {"code": str(w.data)}, stage_options(ProfileOptions, seq_len=16, device="cpu",
                                                                      progress=False)).save(path)
    return path


def _shifted_profile(w: World, tmp: Path) -> Path:
    def edit(data):
        layer = next(iter(data["domains"]["code"]["layers"].values()))
        layer["selected"][0] += 1

    return _profile_with(w, tmp, edit)


def _truncate(w: World, tmp: Path) -> Path:
    target = _copy_model(w, tmp)
    shard = target / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return target


def _pickle_only(w: World, tmp: Path) -> Path:
    target = _copy_model(w, tmp)
    (target / "model.safetensors").unlink()
    (target / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return target


def _router_rows(tensors: dict) -> None:
    name = "model.layers.1.mlp.gate.weight"
    tensors[name] = tensors[name][:6].clone()


def _expert_shape(tensors: dict) -> None:
    name = "model.layers.2.mlp.experts.3.down_proj.weight"
    tensors[name] = tensors[name][:, :8].clone()


M = lambda w: str(w.model)  # noqa: E731
D = lambda w: f"code={w.data}"  # noqa: E731

# (id, function (world, tmp) -> argv)
CASES: list[tuple[str, Callable]] = [
    # command line usage
    ("unknown command", lambda w, t: ["frobnicate"]),
    ("unknown option", lambda w, t: ["profile", M(w), "-d", D(w), "-o", t / "p.json", "--bogus"]),
    ("int option not a number", lambda w, t: ["profile", M(w), "-d", D(w), "-o", t / "p.json", "--max-tokens", "x"]),
    ("int option out of range", lambda w, t: ["profile", M(w), "-d", D(w), "-o", t / "p.json", "--max-tokens", "0"]),
    ("missing required option", lambda w, t: ["profile", M(w), "-d", D(w)]),
    ("missing argument", lambda w, t: ["export", M(w), "-o", t / "o"]),
    ("bad choice", lambda w, t: ["export", M(w), w.plan, "-o", t / "o", "--compensation", "magic"]),
    ("plan --top-k not a number", lambda w, t: ["plan", w.profile, "-o", t / "p.json", "--top-k", "one"]),
    # inspect: checkpoints and config.json
    ("inspect missing dir", lambda w, t: ["inspect", t / "nope"]),
    ("inspect a file", lambda w, t: ["inspect", w.afile]),
    ("inspect no config.json", lambda w, t: ["inspect", _mkdir(t / "empty")]),
    ("config not JSON", lambda w, t: ["inspect", _write(_copy_model(w, t), "config.json", "{oops").parent]),
    ("unsupported model_type", lambda w, t: ["inspect", _edit_config(w, t, model_type="llama")]),
    ("expert count of the wrong type", lambda w, t: ["inspect", _edit_config(w, t, n_routed_experts="sixty-four")]),
    ("top-k zero", lambda w, t: ["inspect", _edit_config(w, t, num_experts_per_tok=0)]),
    ("top-k above expert count", lambda w, t: ["inspect", _edit_config(w, t, num_experts_per_tok=99)]),
    ("negative layer count", lambda w, t: ["inspect", _edit_config(w, t, num_hidden_layers=-1)]),
    ("hidden size of the wrong type", lambda w, t: ["inspect", _edit_config(w, t, hidden_size=32.5)]),
    ("router shape disagrees with expert count", lambda w, t: ["inspect", _edit_tensors(w, t, _router_rows)]),
    ("experts of different shapes", lambda w, t: ["inspect", _edit_tensors(w, t, _expert_shape)]),
    ("pickle-only weights", lambda w, t: ["inspect", _pickle_only(w, t)]),
    ("truncated shard", lambda w, t: ["inspect", _truncate(w, t)]),
    ("profile router shape disagrees", lambda w, t: ["profile", _edit_tensors(w, t, _router_rows), "-d", D(w),
                                                     "-o", t / "p.json"]),
    ("export router shape disagrees", lambda w, t: ["export", _edit_tensors(w, t, _router_rows), w.plan,
                                                    "-o", t / "o"]),
    # profile: data and outputs
    ("data file missing", lambda w, t: ["profile", M(w), "-d", f"code={t / 'none.jsonl'}", "-o", t / "p.json"]),
    ("data spec without name", lambda w, t: ["profile", M(w), "-d", str(w.data), "-o", t / "p.json"]),
    ("domain given twice", lambda w, t: ["profile", M(w), "-d", D(w), "-d", D(w), "-o", t / "p.json"]),
    ("empty data file", lambda w, t: ["profile", M(w), "-d", f"code={_write(t, 'e.jsonl', '')}", "-o", t / "p.json"]),
    ("data file not JSON lines", lambda w, t: ["profile", M(w), "-d", f"code={_write(t, 'b.jsonl', '{x')}",
                                               "-o", t / "p.json"]),
    ("negative token ids", lambda w, t: ["profile", M(w), "-d",
                                         f"code={write_jsonl(t / 'n.jsonl', [[1, -3, 4]])}", "-o", t / "p.json"]),
    ("token id outside the vocabulary", lambda w, t: ["profile", M(w), "-d",
                                                      f"code={write_jsonl(t / 'v.jsonl', [[1, 2, 999]])}",
                                                      "-o", t / "p.json", "--seq-len", "16"]),
    ("seq-len beyond the model's context", lambda w, t: ["profile", M(w), "-d", D(w), "-o", t / "p.json"]),
    ("unsupported data file", lambda w, t: ["profile", M(w), "-d", f"code={_write(t, 'x.csv', 'a,b')}",
                                            "-o", t / "p.json"]),
    ("unknown demo domain", lambda w, t: ["profile", M(w), "-d", "x=demo:klingon", "-o", t / "p.json"]),
    ("unknown demo split", lambda w, t: ["profile", M(w), "-d", "x=demo:code@nosuch", "-o", t / "p.json"]),
    ("offline hf dataset", lambda w, t: ["profile", M(w), "-d", "x=hf:nobody/nothing-here", "-o", t / "p.json"]),
    ("seq-len 1", lambda w, t: ["profile", M(w), "-d", D(w), "-o", t / "p.json", "--seq-len", "1"]),
    ("unknown dtype", lambda w, t: ["profile", M(w), "-d", D(w), "-o", t / "p.json", "--dtype", "float8"]),
    ("unknown device", lambda w, t: ["profile", M(w), "-d", D(w), "-o", t / "p.json", "--device", "tpu"]),
    ("cuda without a GPU", lambda w, t: ["profile", M(w), "-d", D(w), "-o", t / "p.json", "--device", "cuda:7"]),
    ("profile output exists", lambda w, t: ["profile", M(w), "-d", D(w), "-o", _write(t, "p.json", "{}")]),
    ("profile output is a directory", lambda w, t: ["profile", M(w), "-d", D(w), "-o", t, "--overwrite"]),
    ("profile output under a file", lambda w, t: ["profile", M(w), "-d", D(w), "-o", w.afile / "p.json"]),
    ("profile output replaces the model's config", lambda w, t: ["profile", M(w), "-d", D(w),
                                                                 "-o", w.model / "config.json", "--overwrite"]),
    ("profile output inside the model", lambda w, t: ["profile", M(w), "-d", D(w), "-o", w.model / "p.json"]),
    ("merge of different models", lambda w, t: ["profile", "merge", w.profile, _other_profile(w, t),
                                                "-o", t / "m.json"]),
    ("merge of a missing profile", lambda w, t: ["profile", "merge", w.profile, t / "nope.json", "-o", t / "m.json"]),
    # plan
    ("plan from a missing profile", lambda w, t: ["plan", t / "nope.json", "-o", t / "p.json"]),
    ("plan from a file that is not JSON", lambda w, t: ["plan", _write(t, "x.json", "not json"), "-o", t / "p.json"]),
    ("plan from a profile with NaN", lambda w, t: ["plan", _nan_profile(w, t), "-o", t / "p.json"]),
    ("plan from negative counts", lambda w, t: ["plan", _profile_with(
        w, t, lambda d: next(iter(d["domains"]["code"]["layers"].values()))["selected"].__setitem__(0, -5)),
        "-o", t / "p.json"]),
    ("plan from a domain with no data", lambda w, t: ["plan", _profile_with(w, t, _zero_domain), "-o", t / "p.json"]),
    ("plan from a profile with an unknown key", lambda w, t: ["plan", _profile_with(
        w, t, lambda d: d.update(extra=1)), "-o", t / "p.json"]),
    ("keep fraction above 1", lambda w, t: ["plan", w.profile, "-o", t / "p.json", "--keep-fraction", "1.5"]),
    ("keep fraction NaN", lambda w, t: ["plan", w.profile, "-o", t / "p.json", "--keep-fraction", "nan"]),
    ("keep and keep fraction", lambda w, t: ["plan", w.profile, "-o", t / "p.json", "--keep", "2",
                                             "--keep-fraction", "0.5"]),
    ("keep more than there are", lambda w, t: ["plan", w.profile, "-o", t / "p.json", "--keep", "99"]),
    ("unknown target domain", lambda w, t: ["plan", w.profile, "-o", t / "p.json", "--domains", "math"]),
    ("domain weight NaN", lambda w, t: ["plan", w.profile, "-o", t / "p.json", "--domains", "code:nan"]),
    ("protect syntax", lambda w, t: ["plan", w.profile, "-o", t / "p.json", "--protect", "one:two"]),
    ("protect an expert that does not exist", lambda w, t: ["plan", w.profile, "-o", t / "p.json",
                                                            "--protect", "1:99"]),
    ("top-k zero in plan", lambda w, t: ["plan", w.profile, "-o", t / "p.json", "--top-k", "0"]),
    ("plan output exists", lambda w, t: ["plan", w.profile, "-o", w.plan]),
    ("plan show of a missing file", lambda w, t: ["plan", "show", t / "nope.json"]),
    ("plan show of a directory", lambda w, t: ["plan", "show", t]),
    # export
    ("plan for another model", lambda w, t: ["export", str(w.other), w.plan, "-o", t / "o"]),
    ("plan with an unknown key", lambda w, t: ["export", M(w), _edit_json(w.plan, t, "p.json",
                                                                         lambda d: d.update(bogus=True)),
                                               "-o", t / "o"]),
    ("plan keeping an expert twice", lambda w, t: ["export", M(w), _edit_json(
        w.plan, t, "p.json", lambda d: d["layers"]["1"].__setitem__("keep", [0, 0, 1])), "-o", t / "o"]),
    ("shard size overflows", lambda w, t: ["export", M(w), w.plan, "-o", t / "o", "--max-shard-size", "1e999GB"]),
    ("shard size unreadable", lambda w, t: ["export", M(w), w.plan, "-o", t / "o", "--max-shard-size", "abc"]),
    ("export into the source", lambda w, t: ["export", M(w), w.plan, "-o", w.model / "out"]),
    ("export output exists", lambda w, t: ["export", M(w), w.plan, "-o", w.out]),
    ("export output under a file", lambda w, t: ["export", M(w), w.plan, "-o", w.afile / "o"]),
    ("export output is a file", lambda w, t: ["export", M(w), w.plan, "-o", w.afile, "--overwrite"]),
    ("fitted mode without calibration", lambda w, t: ["export", M(w), w.plan, "-o", t / "o",
                                                      "--compensation", "scale"]),
    ("end-to-end steps without distill", lambda w, t: ["export", M(w), w.plan, "-o", t / "o",
                                                       "--distill-e2e-steps", "5"]),
    ("gate without held-out data", lambda w, t: ["export", M(w), w.plan, "-o", t / "o", "--compensation", "scale",
                                                 "--calibration", D(w), "--max-ppl-increase", "0.1"]),
    ("gate with --no-validate", lambda w, t: ["export", M(w), w.plan, "-o", t / "o", "--no-validate",
                                              "--validate-on", D(w), "--max-ppl-increase", "0.1"]),
    ("export ppl gate NaN", lambda w, t: ["export", M(w), w.plan, "-o", t / "o", "--validate-on", D(w),
                                          "--max-ppl-increase", "nan"]),
    ("export cosine gate NaN", lambda w, t: ["export", M(w), w.plan, "-o", t / "o", "--validate-on", D(w),
                                             "--min-cosine", "nan"]),
    ("export cosine gate above 1", lambda w, t: ["export", M(w), w.plan, "-o", t / "o", "--validate-on", D(w),
                                                 "--min-cosine", "2"]),
    ("export unknown task", lambda w, t: ["export", M(w), w.plan, "-o", t / "o", "--validate-on", D(w),
                                          "--validate-tasks", "demo_nonexistent"]),
    ("export task gate without tasks", lambda w, t: ["export", M(w), w.plan, "-o", t / "o", "--validate-on", D(w),
                                                     "--max-task-drop", "0.02"]),
    ("export --push-to-hub to a malformed repo id", lambda w, t: ["export", M(w), w.plan, "-o", t / "o",
                                                                  "--push-to-hub", "a/b/c"]),
    # validate
    ("validate into the original", lambda w, t: ["validate", M(w), w.out, "-d", D(w),
                                                 "-o", w.model / "model.safetensors", "--overwrite"]),
    ("validate into the compressed", lambda w, t: ["validate", M(w), w.out, "-d", D(w), "-o", w.out / "v.json"]),
    ("validate tasks without a tokenizer", lambda w, t: ["validate", M(w), w.out, "-d", D(w), "-o", t / "v.json",
                                                         "--tasks", "demo_code_next_line"]),
    ("validate ppl gate NaN", lambda w, t: ["validate", M(w), w.out, "-d", D(w), "-o", t / "v.json",
                                            "--max-ppl-increase", "nan"]),
    ("validate ppl gate unreadable", lambda w, t: ["validate", M(w), w.out, "-d", D(w), "-o", t / "v.json",
                                                   "--max-ppl-increase", "code=lots"]),
    ("validate cosine gate NaN", lambda w, t: ["validate", M(w), w.out, "-d", D(w), "-o", t / "v.json",
                                               "--min-cosine", "nan"]),
    ("validate gate for an unknown domain", lambda w, t: ["validate", M(w), w.out, "-d", D(w), "-o", t / "v.json",
                                                          "--max-ppl-increase", "math=0.1"]),
    ("validate unrelated models", lambda w, t: ["validate", M(w), _edit_config(w, t, vocab_size=50), "-d", D(w),
                                                "-o", t / "v.json"]),
    ("validate a missing model", lambda w, t: ["validate", M(w), t / "nope", "-d", D(w), "-o", t / "v.json"]),
    ("validate plots folder exists", lambda w, t: ["validate", M(w), w.out, "-d", D(w),
                                                   "-o", _mkdir(t / "v-plots").parent / "v.json"]),
    # report
    ("report of a directory", lambda w, t: ["report", t, "-o", t / "r"]),
    ("report of a file that is not JSON", lambda w, t: ["report", w.afile, "-o", t / "r"]),
    ("report of unrecognised JSON", lambda w, t: ["report", _write(t, "x.json", "[1, 2]"), "-o", t / "r"]),
    ("report output exists", lambda w, t: ["report", w.profile, "-o", _mkdir(t / "r")]),
    ("report output is a file", lambda w, t: ["report", w.profile, "-o", w.afile, "--overwrite"]),
    ("report of a plan from another profile", lambda w, t: ["report", _shifted_profile(w, t), w.plan, "-o", t / "r"]),
    # lens
    ("lens of a missing model", lambda w, t: ["lens", t / "nope", "-d", f"code={w.data}", "-o", t / "l.json"]),
    ("lens data missing", lambda w, t: ["lens", w.model, "-d", f"code={t / 'none.jsonl'}", "-o", t / "l.json"]),
    ("lens output exists", lambda w, t: ["lens", w.model, "-d", f"code={w.data}", "-o", w.afile]),
    ("lens output inside the model", lambda w, t: ["lens", w.model, "-d", f"code={w.data}", "-o",
                                                   w.model / "l.json"]),
    # run
    ("recipe missing", lambda w, t: ["run", t / "nope.yaml"]),
    ("recipe not YAML", lambda w, t: ["run", _write(t, "r.yaml", "model: [unclosed")]),
    ("recipe unknown key", lambda w, t: ["run", _recipe(w, t, extra=1)]),
    ("recipe top-k negative", lambda w, t: ["run", _recipe(w, t, plan__top_k=-1)]),
    ("recipe shard size unreadable", lambda w, t: ["run", _recipe(w, t, export__max_shard_size="abc")]),
    ("recipe gate NaN", lambda w, t: ["run", _recipe(w, t, validate={"domains": {"code": str(w.data)},
                                                                     "max_ppl_increase": math.nan})]),
    ("recipe unknown task", lambda w, t: ["run", _recipe(w, t, validate={"domains": {"code": str(w.data)},
                                                                         "tasks": ["demo_nonexistent"]})]),
    ("recipe work dir under a file", lambda w, t: ["run", _recipe(w, t, work_dir=str(w.afile / "work"))]),
    ("recipe work dir inside the model", lambda w, t: ["run", _recipe(w, t, work_dir=str(w.model / "work"))]),
    ("recipe data missing", lambda w, t: ["run", _recipe(w, t, profile__domains={"code": str(t / "none.jsonl")})]),
    ("recipe lens data missing", lambda w, t: ["run", _recipe(w, t, lens={"domains": {"x": str(t / "none.jsonl")}})]),
    ("recipe --set malformed", lambda w, t: ["run", _recipe(w, t), "--set", "no-equals-sign"]),
    # push and serve-check
    ("push of a folder that is not an export", lambda w, t: ["push", t, "someone/model"]),
    ("push to a malformed repo id", lambda w, t: ["push", w.out, "not a repo id"]),
    ("serve-check of a missing folder", lambda w, t: ["serve-check", t / "nope"]),
    ("serve-check of a per-layer count the tensors disagree with",
     lambda w, t: ["serve-check", _per_layer_output(w, t)]),
]


@pytest.mark.parametrize("name, build", CASES, ids=[name for name, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(name, build, world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")  # push cases fail on their input, not on a token
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = build(world, tmp_path)
    before = _snapshot(world.root, tmp_path)
    code, out, err = run_cli(argv, capsys)
    lines = err.strip("\n").splitlines()
    assert code == 2, (name, code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
    assert "Traceback" not in out + err
    assert _snapshot(world.root, tmp_path) == before, name


def test_the_cases_cover_every_command(world, tmp_path):
    assert len(CASES) >= 60 and len({name for name, _ in CASES}) == len(CASES)
    commands = set()
    for index, (_, build) in enumerate(CASES):
        commands.add(str(build(world, _mkdir(tmp_path / str(index)))[0]))
    assert {"inspect", "profile", "lens", "plan", "export", "validate", "report", "run", "push",
            "serve-check"} <= commands



@pytest.mark.parametrize("command", ["profile", "lens", "validate"])
def test_a_layer_larger_than_free_memory_is_refused_before_any_work(command, world, tmp_path, capsys, monkeypatch):
    """--layerwise holds one decoder layer: one whose weights alone exceed the free memory is refused up front."""
    import psutil

    layer_bytes = 4 * (TINY["n_routed_experts"] * 3 * TINY["hidden_size"] * TINY["moe_intermediate_size"])
    free = psutil.virtual_memory()._replace(available=layer_bytes // 2)  # less than one MoE layer's experts
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
    argv = {"profile": ["profile", M(world), "-d", D(world), "-o", tmp_path / "p.json"],
            "lens": ["lens", M(world), "-d", D(world), "-o", tmp_path / "l.json"],
            "validate": ["validate", M(world), world.out, "-d", D(world), "-o", tmp_path / "v.json"]}[command]
    before = _snapshot(world.root, tmp_path)
    code, out, err = run_cli([*argv, "--layerwise", "--device", "cpu", "--seq-len", "16"], capsys)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("error: one decoder layer at a time still needs decoder layer ")
    assert "GiB on cpu, but " in err and "--dtype bfloat16" in err
    assert _snapshot(world.root, tmp_path) == before
    monkeypatch.undo()
    code, _, err = run_cli([*argv, "--layerwise", "--device", "cpu", "--seq-len", "16"], capsys)  # real memory: runs
    assert code == 0, err
