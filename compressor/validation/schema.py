"""The validation report: original vs compressed on the same held-out tokens (public, versioned JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from compressor.io.json_files import load_json_model, save_json_model

VALIDATION_FORMAT_VERSION = 1


class _Strict(BaseModel):
    # measurements may be NaN or infinite (a broken model): stored as "NaN" / "Infinity", never as null
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")


class ModelRef(_Strict):
    source: str
    family: str
    config_hash: str
    parameters: int
    bytes: int


class DomainResult(_Strict):
    tokens: int
    source: dict
    perplexity_original: float
    perplexity_compressed: float
    perplexity_increase: float  # relative: compressed / original - 1
    kl_mean: float  # mean next-token KL(original || compressed), nats
    top1_agreement: float  # share of tokens whose most likely next token is the same


class LayerResult(_Strict):
    cosine_mean: float  # hidden states after the layer, original vs compressed, mean over tokens
    cosine_p5: float  # 5th percentile over tokens


class Throughput(_Strict):
    """Forward tokens/s of each model on the validation batches (whole-model runs only)."""

    original_tokens_per_second: float
    compressed_tokens_per_second: float
    device: str
    threads: int


class TaskResult(_Strict):
    """One lm-evaluation-harness task, both models scored alike (same documents, seeds and limit)."""

    metric: str  # the task's first metric ("acc", or "exact_match,FILTER" when the task filters its outputs)
    original: float
    original_stderr: float | None  # None where the harness gives none (a single document)
    compressed: float
    compressed_stderr: float | None
    change: float  # compressed - original (absolute)
    higher_is_better: bool
    samples: int  # documents scored per model


class Thresholds(_Strict):
    max_ppl_increase: float | dict[str, float] | None = None  # a dict gates only the domains it names
    min_cosine: float | None = None
    max_task_drop: float | dict[str, float] | None = None  # absolute; a dict gates only the tasks it names


class ValidationReport(_Strict):
    format_version: Literal[1] = VALIDATION_FORMAT_VERSION
    tool_version: str
    original: ModelRef
    compressed: ModelRef
    settings: dict
    thresholds: Thresholds
    domains: dict[str, DomainResult]
    layers: dict[str, LayerResult]
    throughput: Throughput | None = None
    tasks: dict[str, TaskResult] = Field(default_factory=dict)
    passed: bool
    failures: list[str]

    def task_table(self) -> tuple[list[str], list[list[str]]]:
        """Headers and rows of the task scores (for the card and the report)."""
        def score(value: float, stderr: float | None) -> str:
            return f"{value:.4f}" if stderr is None else f"{value:.4f} ± {stderr:.4f}"

        return (["task", "metric", "documents", "original", "compressed", "change"],
                [[name, t.metric, str(t.samples), score(t.original, t.original_stderr),
                  score(t.compressed, t.compressed_stderr), f"{t.change:+.4f}"] for name, t in self.tasks.items()])

    def save(self, path: str | Path, overwrite: bool = True) -> None:
        save_json_model(self, path, overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "ValidationReport":
        return load_json_model(cls, path, "validation report")
