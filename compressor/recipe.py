"""Recipes: profile (+ lens) -> plan -> export (+ validation) -> push in one command, every artifact in a work dir.

Stages whose inputs have not changed (content hashes of their settings and of the artifacts they read)
are skipped, so re-running a recipe after changing e.g. `plan.keep_fraction` redoes plan and export, not profile.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from compressor.errors import UserError

COMPENSATION = Literal["none", "renorm", "scale", "refit", "distill"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ProfileStage(_Section):
    domains: dict[str, str] = Field(description="NAME: SOURCE to profile (demo: sources use the calibration split)")
    max_tokens: PositiveInt = 65536
    seq_len: int = Field(512, ge=2)
    batch_size: PositiveInt = 8
    layerwise: bool = False
    text_field: str = "text"


class LensStage(_Section):
    domains: dict[str, str] = Field(
        default_factory=dict, description="NAME: SOURCE (demo: evaluation split); empty: the profile's domains")
    max_tokens: PositiveInt = 16384
    seq_len: int = Field(512, ge=2)
    batch_size: PositiveInt = 8
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
    top_k: PositiveInt = 1
    ungroup: bool = False
    keep_groups: PositiveInt | None = None


class ExportStage(_Section):
    compensation: COMPENSATION = "distill"
    calibration: dict[str, str] = Field(default_factory=dict)
    max_tokens: PositiveInt = 32768
    seq_len: int = Field(512, ge=2)
    batch_size: PositiveInt = 8
    distill_steps: PositiveInt = 300
    distill_router: bool = False
    distill_e2e_steps: int = Field(0, ge=0)
    distill_e2e_lr: float = Field(4e-4, gt=0)
    max_shard_size: str = "5GB"


class ValidateStage(_Section):
    domains: dict[str, str] = Field(default_factory=dict, description="held-out NAME: SOURCE (demo: evaluation split)")
    max_tokens: int = Field(16384, ge=2)
    max_ppl_increase: float | dict[str, float] | None = Field(
        None, description="relative limit for every domain, or {domain: limit} for the domains it names")
    min_cosine: float | None = None
    tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness tasks scored on both models")
    task_limit: PositiveInt | None = None
    tasks_include: list[str] = Field(default_factory=list, description="folders of harness task YAML files")
    max_task_drop: float | dict[str, float] | None = Field(
        None, description="absolute limit for every task, or {task: limit} for the tasks it names")


class QuantizeStage(_Section):
    scheme: Literal["fp8-dynamic", "w8a16", "w4a16", "mxfp4"]
    group_size: int = Field(128, ge=0, description="w8a16/w4a16: input columns per scale; 0: per output channel")
    max_shard_size: str = "5GB"


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
    lens: LensStage | None = None
    plan: PlanStage = Field(default_factory=PlanStage)
    export: ExportStage = Field(default_factory=ExportStage)
    validate_: ValidateStage | None = Field(None, alias="validate")
    quantize: QuantizeStage | None = None
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
        recipe = Recipe.model_validate(tree)
    except ValidationError as error:
        first = error.errors()[0]
        location = tuple(first["loc"])
        key = ".".join(str(p) for p in location)
        if any(key == o or key.startswith(o + ".") for o in overridden):  # the bad value came from the command line
            raise UserError(f"--set {key}: {first['msg']}") from None
        line = _line_of(text, location)
        where = f"line {line}, " if line else ""
        raise UserError(f"{path}: {where}key {key!r}: {first['msg']}") from None
    try:
        check_recipe(recipe)
    except UserError as error:
        raise UserError(f"{path}: {error}") from None
    return recipe


def _plan_options(recipe: Recipe):
    from compressor.planning import PlanOptions

    p = recipe.plan
    return PlanOptions(strategy=p.strategy, keep=p.keep, keep_fraction=p.keep_fraction, coverage=p.coverage,
                       min_keep=p.min_keep, max_keep=p.max_keep, criterion=p.criterion, domains=p.domains,
                       protect={layer: set(experts) for layer, experts in p.protect.items()}, top_k=p.top_k,
                       compensation=recipe.export.compensation, ungroup=p.ungroup,
                       keep_groups=p.keep_groups)


def _export_options(recipe: Recipe):
    from compressor.export.exporter import (
        DistillOptions, ExportOptions, ExportValidation, FitOptions, RunOptions, parse_size,
    )

    e, validate = recipe.export, recipe.validate_
    return ExportOptions(
        compensation=e.compensation, max_shard_bytes=parse_size(e.max_shard_size), overwrite=True,
        revision=recipe.revision,
        run=RunOptions(device=recipe.device, dtype=recipe.dtype, seq_len=e.seq_len, batch_size=e.batch_size),
        fit=FitOptions(calibration=e.calibration, max_tokens=e.max_tokens,
                       distill=DistillOptions(steps=e.distill_steps, router=e.distill_router,
                                              e2e_steps=e.distill_e2e_steps, e2e_lr=e.distill_e2e_lr)),
        validation=ExportValidation() if validate is None else ExportValidation(
            data=validate.domains, max_tokens=validate.max_tokens, max_ppl_increase=validate.max_ppl_increase,
            min_cosine=validate.min_cosine, tasks=tuple(validate.tasks), task_limit=validate.task_limit,
            tasks_include=tuple(validate.tasks_include), max_task_drop=validate.max_task_drop))


def _at(key: str, check, *args, **kwargs):
    """Run a check, naming the recipe key in its error."""
    try:
        return check(*args, **kwargs)
    except UserError as error:
        raise UserError(f"key {key!r}: {error}") from None


def check_recipe(recipe: Recipe) -> None:
    """The recipe's values, checked together when it is loaded (UserError naming the key): what no machine could
    run. `check_recipe_runnable` adds what depends on this machine (data, devices, paths, Hub token)."""
    from compressor.export.exporter import FITTED_COMPENSATIONS, check_gates_can_run, parse_size
    from compressor.planning.strategies import check_plan_options
    from compressor.runtime import DTYPES

    at = _at
    if recipe.device != "auto" and recipe.device != "cpu" and not recipe.device.startswith("cuda"):
        raise UserError(f"key 'device': cpu, cuda, cuda:N or auto, not {recipe.device!r}")
    if recipe.dtype not in DTYPES:
        raise UserError(f"key 'dtype': one of {', '.join(DTYPES)}, not {recipe.dtype!r}")
    if not recipe.profile.domains:
        raise UserError("key 'profile.domains': list at least one NAME: SOURCE")
    at("plan", check_plan_options, _plan_options(recipe))
    unknown = sorted(set(recipe.plan.domains or {}) - set(recipe.profile.domains))
    if unknown:
        raise UserError(f"key 'plan.domains': {', '.join(unknown)} not profiled (profile.domains has "
                        f"{', '.join(recipe.profile.domains)})")
    export = at("export.max_shard_size", _export_options, recipe)
    if recipe.export.compensation in FITTED_COMPENSATIONS and not recipe.export.calibration:
        raise UserError(f"key 'export.calibration': compensation {recipe.export.compensation} fits on calibration "
                        "data; list NAME: SOURCE entries")
    if recipe.export.distill_e2e_steps and recipe.export.compensation != "distill":
        raise UserError("key 'export.distill_e2e_steps': end-to-end steps apply to compensation distill only")
    if recipe.validate_ is not None:
        at("validate", check_gates_can_run, export)
    if recipe.quantize is not None:
        at("quantize.max_shard_size", parse_size, recipe.quantize.max_shard_size)
    if recipe.push is not None:
        from compressor.hub import check_repo_id

        at("push.repo_id", check_repo_id, recipe.push.repo_id)


def check_recipe_runnable(recipe: Recipe) -> None:
    """Before the first stage: the data sources exist, the device is there, the work dir can be written (and is
    not inside the model), a Hub token is available for push (UserError naming the key)."""
    from compressor.data.sources import check_source
    from compressor.io.atomic import check_not_inside, check_writable_target
    from compressor.runtime import resolve_device

    at = _at
    at("device", resolve_device, recipe.device)
    for name, spec in recipe.profile.domains.items():
        at(f"profile.domains.{name}", check_source, spec, default_split="calibration")
    for name, spec in recipe.export.calibration.items():
        at(f"export.calibration.{name}", check_source, spec, default_split="calibration")
    for name, spec in _lens_domains(recipe).items():
        at(f"lens.domains.{name}", check_source, spec, default_split="evaluation")
    if recipe.validate_ is not None:
        from compressor.export.exporter import check_tasks_can_run

        for name, spec in recipe.validate_.domains.items():
            at(f"validate.domains.{name}", check_source, spec, default_split="evaluation")
        at("validate.tasks", check_tasks_can_run, _export_options(recipe))
    if recipe.push is not None:
        from compressor.hub import check_push_ready

        at("push.repo_id", check_push_ready, recipe.push.repo_id)
    work = Path(recipe.work_dir)
    at("work_dir", check_writable_target, work, True, directory=True)
    model = Path(recipe.model).expanduser()
    if model.is_dir():
        at("work_dir", check_not_inside, work, [model])


def _lens_domains(recipe: Recipe) -> dict[str, str]:
    if recipe.lens is None:
        return {}
    return recipe.lens.domains or recipe.profile.domains


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
    from compressor.export.exporter import ExportValidation, export_checkpoint, validate_export
    from compressor.io.resolve import resolve_model
    from compressor.planning import Plan, make_plan
    from compressor.profiling import Profile, ProfileOptions, profile_model
    from compressor.runtime import ForwardOptions

    check_recipe_runnable(recipe)
    work = Path(recipe.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    state = _State(work)
    model_dir, _ = resolve_model(recipe.model, recipe.revision)
    model_digest = _model_digest(model_dir)
    artifacts = {"profile": work / "profile.json", "lens": None, "plan": work / "plan.json", "model": work / "model"}

    digest = _digest(__version__, model_digest, recipe.profile.model_dump(), recipe.dtype)
    if state.fresh("profile", digest, artifacts["profile"]):
        echo(f"profile: up to date ({artifacts['profile']})")
    else:
        p = recipe.profile
        profile = profile_model(recipe.model, p.domains, ProfileOptions(
            max_tokens=p.max_tokens, forward=ForwardOptions(p.seq_len, p.batch_size, recipe.dtype, recipe.device,
                                                            p.layerwise, p.text_field), revision=recipe.revision))
        profile.save(artifacts["profile"])
        state.record("profile", digest)
        echo(f"profile: wrote {artifacts['profile']}")

    if recipe.lens is not None:
        artifacts["lens"] = _run_lens(recipe, model_digest, work / "lens.json", state, echo)

    digest = _digest(__version__, _file_digest(artifacts["profile"]), recipe.plan.model_dump(),
                     recipe.export.compensation)
    if state.fresh("plan", digest, artifacts["plan"]):
        echo(f"plan: up to date ({artifacts['plan']})")
    else:
        plan = make_plan(Profile.load(artifacts["profile"]), _plan_options(recipe))
        plan.save(artifacts["plan"])
        state.record("plan", digest)
        echo(f"plan: wrote {artifacts['plan']}")

    validate = recipe.validate_
    e = recipe.export
    validate_options = _export_options(recipe)
    # validation is a stage of its own (a threshold change re-validates without re-exporting)
    export_options = replace(validate_options, validation=ExportValidation(enabled=False))
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
            report = validate_export(recipe.model, artifacts["model"], validate_options)
            if report is None:
                raise UserError("validate: no held-out data; list validate.domains (NAME: SOURCE)")
            state.record("validate", digest)
            echo(f"validate: wrote {validation_path}")

    passed = None
    if validation_path.exists():
        from compressor.validation.schema import ValidationReport

        passed = ValidationReport.load(validation_path).passed
    if recipe.quantize is not None:
        artifacts["quantized"], quantized_passed = _run_quantize(recipe, artifacts["model"], validate_options, state,
                                                                 echo)
        passed = quantized_passed if passed is None else passed and quantized_passed is not False
    if recipe.push is not None:
        from compressor.hub import push_output

        if passed is False:
            raise UserError("validation failed: not pushing (fix the recipe or push by hand with --force)")
        url = push_output(artifacts["model"], recipe.push.repo_id, private=recipe.push.private,
                          revision=recipe.push.revision, commit_message=recipe.push.commit_message)
        echo(f"push: {url}")
    artifacts["validation"] = validation_path if validation_path.exists() else None
    return {"artifacts": artifacts, "passed": passed}


def _run_lens(recipe: Recipe, model_digest: str, path: Path, state: _State, echo) -> Path:
    """The lens of the original model (what top-1 routing costs before anything is pruned)."""
    from compressor import __version__
    from compressor.lens import LensOptions, lens_model
    from compressor.runtime import ForwardOptions
    from compressor.lens.plots import lens_headline

    lens, domains = recipe.lens, _lens_domains(recipe)
    digest = _digest(__version__, model_digest, lens.model_dump(), domains, recipe.dtype)
    if state.fresh("lens", digest, path):
        echo(f"lens: up to date ({path})")
        return path
    report = lens_model(recipe.model, domains, LensOptions(
        max_tokens=lens.max_tokens, forward=ForwardOptions(lens.seq_len, lens.batch_size, recipe.dtype, recipe.device,
                                                           lens.layerwise, lens.text_field), revision=recipe.revision))
    report.save(path)
    state.record("lens", digest)
    echo(f"lens: wrote {path}")
    for line in lens_headline(report):
        echo(f"  {line}")
    return path


def _run_quantize(recipe: Recipe, model: Path, options, state: _State, echo) -> tuple[Path, bool | None]:
    """Quantize the export into work_dir/model-SCHEME, validated like the export (original vs quantized)."""
    from compressor import __version__
    from compressor.export.exporter import parse_size
    from compressor.quantize import QuantizeOptions, quantize_checkpoint
    from compressor.validation.schema import ValidationReport

    q = recipe.quantize
    output = model.with_name(f"model-{q.scheme}")
    validation_path = output / "validation.json"
    digest = _digest(__version__, state.data["export"], q.model_dump(),
                     recipe.validate_.model_dump() if recipe.validate_ else None)
    if state.fresh("quantize", digest, output):
        echo(f"quantize: up to date ({output})")
    else:
        result = quantize_checkpoint(model, output, QuantizeOptions(
            scheme=q.scheme, group_size=q.group_size, max_shard_bytes=parse_size(q.max_shard_size), overwrite=True,
            validation=options.validation, run=options.run))
        state.record("quantize", digest)
        echo(f"quantize: wrote {output} ({q.scheme}, {result.bytes / 2**20:.1f} MiB, was "
             f"{result.source_bytes / 2**20:.1f} MiB)")
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return output, ValidationReport.load(validation_path).passed if validation_path.exists() else None
