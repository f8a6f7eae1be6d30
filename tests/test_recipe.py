"""Recipes: the schema (shipped recipes, unknown keys, wrong types, --set) and `moe-compress run` end to end
on a tiny random DeepSeekMoE with pre-tokenized data, including stage skipping by content hashes."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
import yaml

from compressor.errors import UserError
from compressor.recipe import Recipe, load_recipe
from helpers import TINY, run_cli, save_tiny_checkpoint, write_jsonl

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["demo.yaml", "deepseek-moe-16b.yaml", "deepseek-v2-lite.yaml"]
SMALL = """\
model: /models/tiny
work_dir: /tmp/work
profile:
  domains:
    code: code.jsonl
  max_tokens: 256
plan:
  keep_fraction: 0.5
  top_k: 1
export:
  compensation: none
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- the schema -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_are_valid(name):
    path = REPO / "recipes" / name
    recipe = load_recipe(path)
    raw = yaml.safe_load(path.read_text())
    assert recipe.model == raw["model"] and recipe.work_dir == raw["work_dir"]
    assert recipe.profile.domains == raw["profile"]["domains"]
    assert recipe.plan.top_k == 1
    assert recipe.validate_ is not None and recipe.validate_.domains == raw["validate"]["domains"]
    assert recipe.validate_.max_ppl_increase == raw["validate"]["max_ppl_increase"]
    # every key of the file was read into the schema (none silently dropped)
    dumped = recipe.model_dump(by_alias=True)
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert dumped[section][key] == value, (name, section, key)
        else:
            assert dumped[section] == values, (name, section)


def test_demo_recipe_matches_the_readme_description():
    recipe = load_recipe(REPO / "recipes" / "demo.yaml")
    assert recipe.model == "models/reference" and recipe.plan.keep_fraction == 0.5
    assert set(recipe.plan.domains) == {"code", "math"}
    assert {"english", "french", "legal"} <= set(recipe.validate_.domains)
    assert (REPO / recipe.model / "config.json").exists()


def test_unknown_key_names_key_and_line(tmp_path):
    text = SMALL.replace("  keep_fraction: 0.5\n", "  keep_fraction: 0.5\n  keep_fracton: 0.25\n")
    line = text.splitlines().index("  keep_fracton: 0.25") + 1
    with pytest.raises(UserError) as caught:
        load_recipe(write(tmp_path, text))
    message = str(caught.value)
    assert "plan.keep_fracton" in message and f"line {line}" in message
    assert "\n" not in message

    text = SMALL + "colour: blue\n"
    with pytest.raises(UserError, match=rf"line {len(text.splitlines())}, key 'colour'"):
        load_recipe(write(tmp_path, text))


def test_wrong_type_names_the_key(tmp_path):
    text = SMALL.replace("max_tokens: 256", "max_tokens: lots")
    line = text.splitlines().index("  max_tokens: lots") + 1
    with pytest.raises(UserError, match=rf"line {line}, key 'profile.max_tokens'"):
        load_recipe(write(tmp_path, text))
    with pytest.raises(UserError, match="export.compensation"):
        load_recipe(write(tmp_path, SMALL.replace("compensation: none", "compensation: magic")))
    with pytest.raises(UserError, match="'profile'"):
        load_recipe(write(tmp_path, SMALL.split("profile:")[0]))  # a required section missing


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"\(line 3\): not valid YAML"):
        load_recipe(write(tmp_path, "model: x\nwork_dir: w\nprofile: a: b\n"))
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="mapping"):
        load_recipe(write(tmp_path, "- just\n- a list\n"))


def test_set_overrides(tmp_path):
    path = write(tmp_path, SMALL)
    recipe = load_recipe(path, ["work_dir=/elsewhere", "plan.keep_fraction=0.25", "export.compensation=scale",
                                "export.calibration.code=code.jsonl", "validate.max_ppl_increase=0.1",
                                "validate.domains.code=code.jsonl", "profile.domains.math=m.jsonl"])
    assert recipe.work_dir == "/elsewhere"
    assert recipe.plan.keep_fraction == 0.25 and recipe.plan.top_k == 1
    assert recipe.export.compensation == "scale"
    assert recipe.validate_.max_ppl_increase == 0.1 and recipe.validate_.domains == {"code": "code.jsonl"}
    assert recipe.profile.domains == {"code": "code.jsonl", "math": "m.jsonl"}
    assert load_recipe(path).work_dir == "/tmp/work"  # the file itself is untouched


@pytest.mark.parametrize("override, names", [
    ("plan.keep_fractoin=0.25", "plan.keep_fractoin"),
    ("bogus=1", "bogus"),
    ("plan.keep_fraction=lots", "plan.keep_fraction"),
    ("work_dir.sub=1", "work_dir"),
    ("no-equals-sign", "no-equals-sign"),
    ("=value", "key=value"),
])
def test_bad_set_is_an_error(tmp_path, override, names):
    with pytest.raises(UserError) as caught:
        load_recipe(write(tmp_path, SMALL), [override])
    assert names in str(caught.value)
    assert "line " not in str(caught.value)  # the bad key came from the command line, not from the file


def test_cli_bad_recipe_is_one_line_exit_2(tmp_path, capsys):
    work = tmp_path / "work"
    path = write(tmp_path, SMALL.replace("work_dir: /tmp/work", f"work_dir: {work}") + "extra: 1\n")
    code, out, err = run_cli(["run", path], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'extra'" in lines[0]
    assert not work.exists()
    code, _, err = run_cli(["run", write(tmp_path, SMALL, "ok.yaml"), "--set", "plan.nope=1"], capsys)
    assert code == 2 and "plan.nope" in err


# -- `moe-compress run` end to end ------------------------------------------------------------------------



def random_rows(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, TINY["vocab_size"]) for _ in range(rng.randint(4, 24))] for _ in range(count)]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny random DeepSeekMoE, calibration and held-out jsonl files, and a recipe using them."""
    root = tmp_path_factory.mktemp("recipe")
    save_tiny_checkpoint(root / "tiny", seed=0, gate_seed=1)
    files = {name: write_jsonl(root / f"{name}.jsonl", random_rows(seed, 12))
             for seed, name in enumerate(["code", "math", "code-eval", "math-eval"])}
    recipe = {
        "model": str(root / "tiny"), "work_dir": str(root / "work"), "device": "cpu",
        "profile": {"domains": {"code": str(files["code"]), "math": str(files["math"])}, "max_tokens": 200,
                    "seq_len": 16, "batch_size": 4},
        "lens": {"max_tokens": 120, "seq_len": 16},  # on the profile's domains
        "plan": {"strategy": "uniform", "keep_fraction": 0.5, "domains": {"code": 1}, "top_k": 1},
        "export": {"compensation": "scale", "calibration": {"code": str(files["code"])}, "max_tokens": 200,
                   "seq_len": 16, "batch_size": 4},
        "validate": {"domains": {"code": str(files["code-eval"]), "math": str(files["math-eval"])},
                     "max_tokens": 200, "max_ppl_increase": 10.0},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return root


def stage_lines(out: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^(profile|lens|plan|export|validate): (.*)$", out, re.MULTILINE)}


def snapshot(work: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every artifact file; the HTML report is rebuilt on every run and left out."""
    return {str(p.relative_to(work)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(work.rglob("*"))
            if p.is_file() and "report" not in p.relative_to(work).parts}


@pytest.mark.slow
def test_run_end_to_end_then_skips_then_reruns_what_changed(project, capsys):
    from compressor.planning import Plan
    from compressor.profiling import Profile
    from compressor.validation.schema import ValidationReport

    recipe, work = project / "recipe.yaml", project / "work"
    code, out, err = run_cli(["run", recipe], capsys)
    assert code == 0, err
    stages = stage_lines(out)
    assert all(stages[s].startswith("wrote") for s in ("profile", "lens", "plan", "export", "validate")), out

    from compressor.lens import LensReport

    lens = LensReport.load(work / "lens.json")
    assert set(lens.domains) == {"code", "math"} and lens.model.top_k == 3
    assert all(0 < d.tokens <= 120 for d in lens.domains.values())
    profile = Profile.load(work / "profile.json")
    assert set(profile.domains) == {"code", "math"}
    assert all(d.tokens <= 200 for d in profile.domains.values())
    plan = Plan.load(work / "plan.json")
    assert plan.kept().keys() == {1, 2} and all(len(k) == 4 for k in plan.kept().values())
    assert plan.top_k == 1 and plan.compensation == "scale"
    config = json.loads((work / "model" / "config.json").read_text())
    assert config["n_routed_experts"] == 4 and config["num_experts_per_tok"] == 1
    provenance = json.loads((work / "model" / "moe_compress_provenance.json").read_text())
    assert provenance["compensation"] == "scale"
    validation = ValidationReport.load(work / "model" / "validation.json")
    assert set(validation.domains) == {"code", "math"} and validation.passed
    assert validation.thresholds.max_ppl_increase == 10.0
    assert (work / "model" / "plots" / "cosine.png").exists()
    page = (work / "report" / "report.html").read_text()
    assert "Routing profile" in page and "Plan: top-1" in page and "Validation: passed" in page
    assert "Lens of" in page and (work / "report" / "lens-code.png").exists()
    summary = (work / "report" / "summary.md").read_text()
    assert "## Concentration" in summary and "# Lens of" in summary
    assert f"report: {work / 'report' / 'report.html'}" in out
    assert re.search(r"^code\s+\d+", out, re.MULTILINE)  # the validation table

    # the same recipe again: every stage is skipped, nothing is rewritten
    before = snapshot(work)
    code, out, err = run_cli(["run", recipe], capsys)
    assert code == 0, err
    stages = stage_lines(out)
    assert set(stages) == {"profile", "lens", "plan", "export", "validate"}
    assert all(line.startswith("up to date") for line in stages.values()), out
    assert snapshot(work) == before

    # a plan setting: plan, export and validation rerun, profile does not
    code, out, err = run_cli(["run", recipe, "--set", "plan.keep_fraction=0.25"], capsys)
    assert code == 0, err
    stages = stage_lines(out)
    assert stages["profile"].startswith("up to date") and stages["lens"].startswith("up to date")
    assert all(stages[s].startswith("wrote") for s in ("plan", "export", "validate")), out
    after = snapshot(work)
    assert after["profile.json"] == before["profile.json"] and after["lens.json"] == before["lens.json"]
    assert after["plan.json"] != before["plan.json"] and after["model/config.json"] != before["model/config.json"]
    assert all(len(k) == 2 for k in Plan.load(work / "plan.json").kept().values())
    assert json.loads((work / "model" / "config.json").read_text())["n_routed_experts"] == 2
    assert ValidationReport.load(work / "model" / "validation.json").compressed.parameters < \
        validation.compressed.parameters

    # a validation gate that fails: only validation reruns (the export is kept), the run exits 1
    before = snapshot(work)
    code, out, err = run_cli(["run", recipe, "--set", "plan.keep_fraction=0.25",
                              "--set", "validate.min_cosine=0.999999"], capsys)
    assert code == 1, (out, err)
    stages = stage_lines(out)
    assert stages["profile"].startswith("up to date") and stages["plan"].startswith("up to date")
    assert stages["export"].startswith("up to date") and stages["validate"].startswith("wrote")
    weights = [name for name in before if name.endswith((".safetensors", "config.json"))]
    assert weights and all(snapshot(work)[name] == before[name] for name in weights)
    assert "validation FAILED" in err
    failed = ValidationReport.load(work / "model" / "validation.json")
    assert not failed.passed and all(f.startswith("layer ") for f in failed.failures)
    assert "Validation: FAILED" in (work / "report" / "report.html").read_text()
    assert snapshot(work)["profile.json"] == before["profile.json"]


def test_recipe_schema_is_strict_in_every_section():
    for section in ("profile", "lens", "plan", "export", "validate", "quantize", "push"):
        field = Recipe.model_fields["validate_" if section == "validate" else section]
        model = getattr(field.annotation, "__args__", (field.annotation,))[0]
        assert model.model_config.get("extra") == "forbid", section
    assert Recipe.model_config.get("extra") == "forbid"
