"""The lens file: early decoding of single vs ensemble experts, per domain and MoE layer (public, versioned JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from compressor.io.json_files import load_json_model, save_json_model
from compressor.profiling.schema import ModelIdentity, SourceDescription

LENS_FORMAT_VERSION = 1


class _Strict(BaseModel):
    # measurements of a broken model may be NaN: stored as "NaN", never as null
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")


class LensLayer(_Strict):
    """One MoE layer L, means over the domain's tokens that have a next token. h_k: the residual stream after layer
    L; h_j: the same with L's routed part reduced to its j highest-weight experts (routed weights unchanged, shared
    experts kept, earlier layers original); p(h) = softmax(lm_head(final_norm(h)))."""

    kl_topk_top1: float = Field(description="mean KL(p(h_k) || p(h_1)), nats")
    top1_agreement: float = Field(description="share of tokens with argmax p(h_k) == argmax p(h_1)")
    cosine: float = Field(description="mean cosine(h_k, h_1)")
    early_accuracy_topk: float = Field(description="share of tokens where argmax p(h_k) is the true next token")
    early_accuracy_top1: float = Field(description="share of tokens where argmax p(h_1) is the true next token")
    final_agreement_topk: float = Field(description="share of tokens where argmax p(h_k) is the model's prediction")
    kl_by_experts: list[float] = Field(description="mean KL(p(h_k) || p(h_j)) for j = 1..k")


class LensDomain(_Strict):
    tokens: NonNegativeInt
    source: SourceDescription
    layers: dict[str, LensLayer]


class LensSettings(_Strict):
    max_tokens: int | None = None
    seq_len: int
    batch_size: int
    dtype: str
    device: str
    layerwise: bool = False
    world_size: int = 1


class LensReport(_Strict):
    format_version: Literal[1] = LENS_FORMAT_VERSION
    tool_version: str
    model: ModelIdentity
    settings: LensSettings
    domains: dict[str, LensDomain]

    def save(self, path: str | Path, overwrite: bool = True) -> None:
        save_json_model(self, path, overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "LensReport":
        return load_json_model(cls, path, "lens report")
