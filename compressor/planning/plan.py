"""The plan file: which routed experts to keep per MoE layer, and the routing width (public, versioned JSON)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from compressor.families.base import format_ranges
from compressor.errors import UserError
from compressor.profiling.schema import ModelIdentity, config_hash

PLAN_FORMAT_VERSION = 1
COMPENSATIONS = ("none", "renorm", "scale", "refit", "distill")


def non_uniform_note(family: str) -> str:
    """What `plan` and `export` say about a non-uniform plan for `family` (a family name): how its output loads and
    whether vLLM serves it (moe-compress's vLLM plugin registers per-layer variants of vLLM's classes)."""
    from compressor.families import FAMILIES
    from compressor.serving.check import PLUGIN_INSTALL

    adapter = FAMILIES.get(family)
    serving = (f"vLLM serves it with moe-compress's vLLM plugin ({PLUGIN_INSTALL})"
               if adapter is not None and adapter.vllm_per_layer_architecture
               else "vLLM cannot serve it (one expert count per model)")
    return ("non-uniform plan: plain transformers needs the same expert count in every layer, so the output loads "
            f"with moe-compress's modeling code (import compressor, or trust_remote_code=True); {serving}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class LayerPlan(_Strict):
    keep: list[int] = Field(description="original ids of the routed experts kept in this layer")


class StrategyRecord(_Strict):
    name: str
    parameters: dict = Field(default_factory=dict)


class Plan(_Strict):
    """A keep-plan for one model. Hand-written plans need only format_version, model, top_k and layers."""

    format_version: Literal[1] = PLAN_FORMAT_VERSION
    tool_version: str | None = None
    model: ModelIdentity
    top_k: int = Field(description="experts each token is routed to in the output")
    compensation: Literal["none", "renorm", "scale", "refit", "distill"] = "distill"
    ungroup: bool = Field(False, description="rewrite a group-limited router to plain top-k (any expert choice is "
                                             "then valid)")
    layers: dict[str, LayerPlan]
    strategy: StrategyRecord | None = None
    profile_hash: str | None = Field(None, description="Profile.content_hash() of the profile the plan came from")
    predicted_coverage: dict[str, dict[str, float]] | None = Field(
        None, description="per domain and layer: share of the domain's routing decisions that land on kept experts"
    )

    _path: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _consistent(self):
        problem = plan_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    # -- views ------------------------------------------------------------------------------------

    def kept(self) -> dict[int, list[int]]:
        """{layer: kept original expert ids, ascending} in layer order."""
        return {int(layer): sorted(int(e) for e in spec.keep) for layer, spec in
                sorted(self.layers.items(), key=lambda item: int(item[0]))}

    def is_uniform(self) -> bool:
        return len({len(spec.keep) for spec in self.layers.values()}) <= 1

    def content_hash(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    def __eq__(self, other) -> bool:  # the file a plan was loaded from does not make it another plan
        return isinstance(other, Plan) and self.model_dump() == other.model_dump()

    @property
    def label(self) -> str:
        """How messages name this plan: its file when loaded from one."""
        return f"plan {self._path}" if self._path else "the plan"

    # -- files ------------------------------------------------------------------------------------

    def save(self, path: str | Path, overwrite: bool = True) -> None:
        from compressor.io.atomic import write_text_atomic

        write_text_atomic(Path(path), self.model_dump_json(indent=1, exclude_none=True) + "\n", overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UserError(f"plan {path} does not exist") from None
        except IsADirectoryError:
            raise UserError(f"plan {path} is a directory, not a plan file") from None
        try:
            plan = cls.model_validate_json(text)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            message = str(first["msg"]).removeprefix("Value error, ")
            raise UserError(f"{path} is not a valid plan: {where + ': ' if where else ''}{message}") from None
        except ValueError as error:
            raise UserError(f"{path} is not a valid plan: {error}") from None
        plan._path = str(path)
        return plan


def plan_problem(plan: Plan) -> str | None:
    """The first inconsistency between a plan's layers/top_k and its own model identity, or None."""
    model = plan.model
    moe = [int(layer) for layer in model.moe_layers]
    layers: dict[int, list[int]] = {}
    for key, spec in plan.layers.items():
        try:
            layer = int(key)
        except ValueError:
            return f"layers: {key!r} is not a layer index"
        if layer in layers:
            return f"layers: layer {layer} appears twice"
        if layer not in moe:
            return f"layer {layer} is not an MoE layer of {model.source} (MoE layers: {format_ranges(moe)})"
        layers[layer] = list(spec.keep)
    missing = [layer for layer in moe if layer not in layers]
    if missing:
        return f"no entry for MoE layers {format_ranges(missing)} (every MoE layer needs its kept experts)"
    if plan.top_k < 1:
        return f"top_k must be at least 1, got {plan.top_k}"
    for layer in sorted(layers):
        keep = layers[layer]
        count = _expert_count(model, layer)
        if not keep:
            return f"layer {layer} keeps no experts (keep at least one, and at least top_k={plan.top_k})"
        duplicates = sorted({e for e in keep if keep.count(e) > 1})
        if duplicates:
            return f"layer {layer} lists expert {duplicates[0]} twice"
        bad = [e for e in keep if count is not None and not 0 <= e < count]
        if count is not None and bad:
            return f"layer {layer} has experts 0..{count - 1}; there is no expert {bad[0]}"
        if plan.top_k > len(keep):
            return f"top_k={plan.top_k} exceeds the {len(keep)} experts kept in layer {layer}"
    return None


def _expert_count(model: ModelIdentity, layer: int) -> int | None:
    count = model.experts_per_layer.get(str(layer))
    return int(count) if count is not None else None


def check_plan_matches(plan: Plan, config: Mapping, family) -> dict[int, list[int]]:
    """Fail (UserError) unless `plan` was made for the model with `config` (a config.json dict) of `family`,
    and satisfies the family's constraints (e.g. balanced expert groups); returns ``plan.kept()`` checked."""
    label = plan.label
    if plan.model.family != family.name:
        raise UserError(
            f"{label} is for another model (family differs: the plan is for {plan.model.family}, "
            f"this model is {family.name}); it was made for {plan.model.source}"
        )
    moe = family.moe_layers(config)
    if [int(layer) for layer in plan.model.moe_layers] != moe:
        raise UserError(
            f"{label} is for another model (MoE layers differ: the plan's {format_ranges(plan.model.moe_layers)}, "
            f"this model's {format_ranges(moe)}); it was made for {plan.model.source}"
        )
    for layer in moe:
        planned, actual = _expert_count(plan.model, layer), family.num_experts(config, layer)
        if planned != actual:
            raise UserError(
                f"{label} is for another model (expert count differs: layer {layer} has {planned} experts in the "
                f"plan's model, {actual} in this one); it was made for {plan.model.source}"
            )
    actual_hash = config_hash(dict(config), family.top_k_key)
    if plan.model.config_hash != actual_hash:
        raise UserError(
            f"{label} is for another model (config hash differs: the plan's {plan.model.config_hash[:12]}, "
            f"this model's {actual_hash[:12]}); it was made for {plan.model.source}"
        )
    problem = plan_problem(plan)  # plans edited in memory after validation
    if problem:
        raise UserError(f"{label}: {problem}")
    return family.check_kept(family.ungrouped(config) if plan.ungroup else config, plan.kept(), plan.top_k)


