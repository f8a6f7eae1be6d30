"""The profile file: per-domain routing statistics of one model (public, versioned JSON format)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveInt, model_validator

from compressor.io.json_files import load_json_model, save_json_model

PROFILE_FORMAT_VERSION = 1
STATISTICS = ("selected", "top1", "gate_mass", "reap")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ExpertGroups(_Strict):
    """A group-limited router: each token chooses among `chosen` of `count` contiguous expert groups."""

    count: PositiveInt = Field(description="contiguous expert groups per MoE layer")
    chosen: PositiveInt = Field(description="groups open to each token")
    min_kept: PositiveInt = Field(description="fewest experts a group can keep")


class ModelIdentity(_Strict):
    """Which model a profile (or plan) belongs to."""

    source: str = Field(description="local path or Hub id as given")
    revision: str | None = None
    family: str
    config_hash: str = Field(description="sha256 of the canonical JSON of the architecture keys of config.json")
    moe_layers: list[NonNegativeInt]
    experts_per_layer: dict[str, PositiveInt]
    top_k: PositiveInt
    expert_groups: ExpertGroups | None = Field(None, description="the router's expert groups (None: no groups)")


class SourceDescription(_Strict):
    kind: str
    spec: str
    content_hash: str | None = None
    details: dict = Field(default_factory=dict)


class LayerStatistics(_Strict):
    """Per routed expert (index = expert id); only `selected` is required (e.g. imported counts)."""

    selected: list[NonNegativeInt]
    top1: list[NonNegativeInt] | None = None
    gate_mass: list[NonNegativeFloat] | None = None
    reap: list[NonNegativeFloat] | None = None
    top1_routed_cosine_sum: float | None = Field(
        None, description="sum over tokens of cos(top-1 expert's weighted output, full routed output)"
    )
    top1_layer_cosine_sum: float | None = Field(
        None, description="sum over tokens of cos(layer output with top-1 routing, layer output with top-k routing)"
    )
    cosine_tokens: NonNegativeInt | None = None

    @model_validator(mode="after")
    def _same_lengths(self):
        n = len(self.selected)
        for name in ("top1", "gate_mass", "reap"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries but selected has {n}")
        return self

    def available(self) -> set[str]:
        return {name for name in STATISTICS if getattr(self, name) is not None}


class DomainProfile(_Strict):
    tokens: NonNegativeInt
    sequences: NonNegativeInt | None = None
    source: SourceDescription
    layers: dict[str, LayerStatistics]


class ProfileSettings(_Strict):
    max_tokens: int | None = None
    seq_len: int | None = None
    batch_size: int | None = None
    dtype: str | None = None
    device: str | None = None
    layerwise: bool = False
    world_size: int = 1


class Profile(_Strict):
    format_version: Literal[1] = PROFILE_FORMAT_VERSION
    tool_version: str
    model: ModelIdentity
    settings: ProfileSettings
    domains: dict[str, DomainProfile]

    def statistics_available(self) -> set[str]:
        """Statistics present in every layer of every domain."""
        sets = [stats.available() for d in self.domains.values() for stats in d.layers.values()]
        return set.intersection(*sets) if sets else set()

    def content_hash(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    def save(self, path: str | Path, overwrite: bool = True) -> None:
        save_json_model(self, path, overwrite, exclude_none=True)

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        return load_json_model(cls, path, "profile")


def config_hash(config: dict, top_k_key: str) -> str:
    """Hash of a model's architecture: config.json without bookkeeping keys that do not change the weights, nor
    the family's routing width (`top_k_key`: a top-k override keeps the weights)."""
    ignored = {"transformers_version", "torch_dtype", "dtype", "_name_or_path", "auto_map", "architectures",
               "use_cache", top_k_key}
    canonical = json.dumps({k: v for k, v in config.items() if k not in ignored}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
