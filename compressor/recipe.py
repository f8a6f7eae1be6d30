"""Recipes: profile -> plan -> export (+ validation) -> push in one command, with every artifact in a work dir.

Stages whose inputs have not changed (content hashes of their settings and of the artifacts they read)
are skipped, so re-running a recipe after changing e.g. `plan.keep_fraction` redoes plan and export, not profile.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compressor.errors import UserError

COMPENSATION = Literal["none", "renorm", "scale", "refit", "distill"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProfileStage(_Section):
    domains: dict[str, str] = Field(description="NAME: SOURCE to profile (demo: sources use the calibration split)")
    max_tokens: int = 65536
    seq_len: int = 512
    batch_size: int = 8
    layerwise: bool = False
    text_field: str = "text"


class PlanStage(_Section):
    strategy: Literal["uniform", "coverage", "global"] = "uniform"
    keep: int | None = None
    keep_fraction: float | None = None
    coverage: float | None = None
    min_keep: int | None = None
    max_keep: int | None = None
    criterion: Literal["frequency", "top1", "gate", "reap"] = "frequency"
    domains: dict[str, float] | None = Field(None, description="targeted domains and their weights")
    protect: dict[int, list[int]] = Field(default_factory=dict)
    top_k: int = 1


class ExportStage(_Section):
    compensation: COMPENSATION = "distill"
    calibration: dict[str, str] = Field(default_factory=dict)
    max_tokens: int = 32768
    seq_len: int = 512
    batch_size: int = 8
    distill_steps: int = 300
    distill_router: bool = False
    distill_e2e_steps: int = Field(0, ge=0)
    distill_e2e_lr: float = Field(4e-4, gt=0)
    max_shard_size: str = "5GB"


class ValidateStage(_Section):
    domains: dict[str, str] = Field(default_factory=dict, description="held-out NAME: SOURCE (demo: evaluation split)")
    max_tokens: int = 16384
    max_ppl_increase: float | dict[str, float] | None = Field(
        None, description="relative limit for every domain, or {domain: limit} for the domains it names")
    min_cosine: float | None = None


class PushStage(_Section):
    repo_id: str
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None


class Recipe(_Section):
    model: str
    revision: str | None = None
    work_dir: str = "work"
    device: str = "auto"
    dtype: str = "float32"
    profile: ProfileStage
    plan: PlanStage = Field(default_factory=PlanStage)
    export: ExportStage = Field(default_factory=ExportStage)
    validate_: ValidateStage | None = Field(None, alias="validate")
    push: PushStage | None = None


def _set(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {dotted}: {key!r} is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else None


def _line_of(text: str, location: tuple) -> int | None:
    """Line (1-based) of the YAML node at `location` (a pydantic error location), if it exists in the text."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in location:
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
        if match is None:
            break
        line = match[0].start_mark.line + 1
        node = match[1]
    return line


def load_recipe(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read and validate a recipe; `overrides` are `key.sub=value` strings (YAML values)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"recipe {path} does not exist") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: a recipe is a mapping of keys (model, work_dir, profile, plan, ...)")
    overridden = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise UserError(f"--set {override!r}: expected key=value, e.g. --set work_dir=/tmp/run")
        _set(tree, key.strip(), value.strip())
        overridden.append(key.strip())
    try:
        return Recipe.model_validate(tree)
    except ValidationError as error:
        first = error.errors()[0]
        location = tuple(first["loc"])
        key = ".".join(str(p) for p in location)
        if any(key == o or key.startswith(o + ".") for o in overridden):  # the bad value came from the command line
            raise UserError(f"--set {key}: {first['msg']}") from None
        line = _line_of(text, location)
        where = f"line {line}, " if line else ""
        raise UserError(f"{path}: {where}key {key!r}: {first['msg']}") from None


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model_digest(model_dir: Path) -> str:
    """Identity of a checkpoint: its config, index and shard sizes (no need to read GBs of weights)."""
    parts = []
    for name in sorted(p.name for p in model_dir.iterdir()):
        path = model_dir / name
        if name.endswith(".json"):
            parts.append((name, _file_digest(path)))
        elif name.endswith(".safetensors"):
            parts.append((name, path.stat().st_size, int(path.stat().st_mtime)))
    return _digest(parts)


class _State:
    def __init__(self, work: Path):
        self.path = work / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def fresh(self, stage: str, digest: str, artifact: Path) -> bool:
        return self.data.get(stage) == digest and artifact.exists()

    def forget(self, stage: str) -> None:
        self.data.pop(stage, None)

    def record(self, stage: str, digest: str) -> None:
        from compressor.io.atomic import write_text_atomic

        self.data[stage] = digest
        write_text_atomic(self.path, json.dumps(self.data, indent=1) + "\n")


def run_recipe(recipe: Recipe, echo=print) -> dict:
    """Run every stage (skipping up-to-date ones); returns artifact paths and whether validation passed."""
    from compressor import __version__
    from compressor.export.exporter import ExportOptions, export_checkpoint, parse_size, validate_export
    from compressor.io.resolve import resolve_model
    from compressor.planning import Plan, PlanOptions, make_plan
    from compressor.profiling import Profile, ProfileOptions, profile_model

    work = Path(recipe.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    state = _State(work)
    model_dir, _ = resolve_model(recipe.model, recipe.revision)
    model_digest = _model_digest(model_dir)
    artifacts = {"profile": work / "profile.json", "plan": work / "plan.json", "model": work / "model"}

    digest = _digest(__version__, model_digest, recipe.profile.model_dump(), recipe.dtype)
    if state.fresh("profile", digest, artifacts["profile"]):
        echo(f"profile: up to date ({artifacts['profile']})")
    else:
        p = recipe.profile
        profile = profile_model(recipe.model, p.domains, ProfileOptions(
            max_tokens=p.max_tokens, seq_len=p.seq_len, batch_size=p.batch_size, dtype=recipe.dtype,
            device=recipe.device, layerwise=p.layerwise, text_field=p.text_field, revision=recipe.revision))
        profile.save(artifacts["profile"])
        state.record("profile", digest)
        echo(f"profile: wrote {artifacts['profile']}")

    digest = _digest(__version__, _file_digest(artifacts["profile"]), recipe.plan.model_dump(),
                     recipe.export.compensation)
    if state.fresh("plan", digest, artifacts["plan"]):
        echo(f"plan: up to date ({artifacts['plan']})")
    else:
        p = recipe.plan
        plan = make_plan(Profile.load(artifacts["profile"]), PlanOptions(
            strategy=p.strategy, keep=p.keep, keep_fraction=p.keep_fraction, coverage=p.coverage,
            min_keep=p.min_keep, max_keep=p.max_keep, criterion=p.criterion, domains=p.domains,
            protect={layer: set(experts) for layer, experts in p.protect.items()}, top_k=p.top_k,
            compensation=recipe.export.compensation))
        plan.save(artifacts["plan"])
        state.record("plan", digest)
        echo(f"plan: wrote {artifacts['plan']}")

    validate = recipe.validate_
    e = recipe.export
    export_options = ExportOptions(
        compensation=e.compensation, calibration=e.calibration, max_shard_bytes=parse_size(e.max_shard_size),
        overwrite=True, revision=recipe.revision, device=recipe.device, dtype=recipe.dtype,
        max_tokens=e.max_tokens, seq_len=e.seq_len, batch_size=e.batch_size, distill_steps=e.distill_steps,
        distill_router=e.distill_router, distill_e2e_steps=e.distill_e2e_steps, distill_e2e_lr=e.distill_e2e_lr,
        validate=False,
        validation_data=validate.domains if validate else {},
        validation_tokens=validate.max_tokens if validate else 16384,
        max_ppl_increase=validate.max_ppl_increase if validate else None,
        min_cosine=validate.min_cosine if validate else None)
    digest = _digest(__version__, model_digest, _file_digest(artifacts["plan"]), e.model_dump(), recipe.dtype)
    if state.fresh("export", digest, artifacts["model"]):
        echo(f"export: up to date ({artifacts['model']})")
    else:
        result = export_checkpoint(recipe.model, Plan.load(artifacts["plan"]), artifacts["model"], export_options)
        state.forget("validate")
        state.record("export", digest)
        echo(f"export: wrote {artifacts['model']} ({result.bytes / 2**20:.1f} MiB, compensation {result.compensation})")

    validation_path = artifacts["model"] / "validation.json"
    if validate is not None:
        # its own stage: changing a threshold or the held-out data re-validates without re-exporting
        digest = _digest(__version__, state.data["export"], validate.model_dump())
        if state.fresh("validate", digest, validation_path):
            echo(f"validate: up to date ({validation_path})")
        else:
            report = validate_export(recipe.model, artifacts["model"], export_options)
            if report is None:
                raise UserError("validate: no held-out data; list validate.domains (NAME: SOURCE)")
            state.record("validate", digest)
            echo(f"validate: wrote {validation_path}")

    passed = None
    if validation_path.exists():
        from compressor.validation.schema import ValidationReport

        passed = ValidationReport.load(validation_path).passed
    if recipe.push is not None:
        from compressor.hub import push_output

        if passed is False:
            raise UserError("validation failed: not pushing (fix the recipe or push by hand with --force)")
        url = push_output(artifacts["model"], recipe.push.repo_id, private=recipe.push.private,
                          revision=recipe.push.revision, commit_message=recipe.push.commit_message)
        echo(f"push: {url}")
    artifacts["validation"] = validation_path if validation_path.exists() else None
    return {"artifacts": artifacts, "passed": passed}
