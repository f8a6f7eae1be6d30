"""Model-family adapters: what stages need to know about a family, behind one interface.

`detect_family(config)` picks the adapter from ``config["model_type"]``; `get_family(name)` by family name. Adding a
family is one adapter module listed here (plus its tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import UserError
from compressor.families.base import FamilyAdapter, RouterSpec, TensorRole
from compressor.families.deepseek_moe import DeepseekMoEFamily
from compressor.families.deepseek_v2 import DeepseekV2Family
from compressor.families.deepseek_v3 import DeepseekV3Family
from compressor.families.ernie4_5_moe import Ernie45MoEFamily
from compressor.families.glm4_moe import Glm4MoeFamily
from compressor.families.gpt_oss import GptOssFamily
from compressor.families.minimax_m2 import MiniMaxM2Family
from compressor.families.mixtral import MixtralFamily
from compressor.families.olmoe import OlmoeFamily
from compressor.families.qwen_moe import Qwen2MoEFamily, Qwen3MoEFamily, Qwen3NextFamily

FAMILIES: dict[str, FamilyAdapter] = {
    family.name: family
    for family in (DeepseekMoEFamily(), DeepseekV2Family(), DeepseekV3Family(), Glm4MoeFamily(), Qwen2MoEFamily(),
                   Qwen3MoEFamily(), MixtralFamily(), OlmoeFamily(), MiniMaxM2Family(), Ernie45MoEFamily(),
                   GptOssFamily(), Qwen3NextFamily())
}
_BY_MODEL_TYPE: dict[str, FamilyAdapter] = {
    model_type: family for family in FAMILIES.values() for model_type in family.model_types
}


def supported_families() -> str:
    """``"deepseek_moe (model_type deepseek), deepseek_v2 (model_type deepseek_v2), ..."``."""
    return ", ".join(f"{name} (model_type {', '.join(f.model_types)})" for name, f in FAMILIES.items())


def detect_family(config: Mapping) -> FamilyAdapter:
    """The adapter for a config dict (by ``model_type``); UserError naming what is missing otherwise."""
    model_type = config.get("model_type") if isinstance(config, Mapping) else None
    family = _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        what = f"model_type {model_type!r}" if model_type is not None else "a config.json without model_type"
        hint = ""
        if isinstance(model_type, str) and _transformers_knows(model_type):
            hint = (" (transformers implements it, but moe-compress has no adapter saying where its router, experts "
                    "and expert count are)")
        raise UserError(f"unsupported model: {what}{hint}; supported families: {supported_families()}")
    return family


def get_family(name: str) -> FamilyAdapter:
    """The adapter named `name` (e.g. ``"deepseek_moe"``); a model_type is accepted too."""
    family = FAMILIES.get(name) or _BY_MODEL_TYPE.get(name)
    if family is None:
        raise UserError(f"unknown model family {name!r}; supported families: {supported_families()}")
    return family


@dataclass
class Checkpoint:
    """A local checkpoint opened for a stage: its reader (headers only), config.json, family and on-disk layout."""

    reader: object
    config: dict
    family: FamilyAdapter
    layout: object

    def close(self) -> None:
        self.reader.close()


def open_checkpoint(directory: Path, quantized: bool = False) -> Checkpoint:
    """Open a checkpoint directory and check that its config and tensors make a model of a supported family
    (UserError, one line, otherwise). Reads headers only. `quantized`: a compressed-tensors checkpoint (its
    `quantization_config` present) is accepted without the tensor check (its weights are stored packed); refused
    otherwise."""
    from compressor.families import quantization
    from compressor.families.layout import CheckpointLayout
    from compressor.io import CheckpointReader

    reader = CheckpointReader(directory)
    try:
        config = reader.config
        family = detect_family(config)
        family.check_config(config)
        packed = quantization.method(config) == quantization.COMPRESSED_TENSORS
        if packed and not quantized:
            raise UserError(f"{directory} is a quantized output (compressed-tensors): validate or serve it; profile, "
                            "plan, export and quantize read the unquantized model")
        layout = CheckpointLayout(family, config, reader.names())
        if not packed:
            layout.validate(reader)
    except BaseException:
        reader.close()
        raise
    return Checkpoint(reader, config, family, layout)


def _transformers_knows(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


__all__ = [
    "FAMILIES",
    "Checkpoint",
    "open_checkpoint",
    "FamilyAdapter",
    "RouterSpec",
    "TensorRole",
    "detect_family",
    "get_family",
    "supported_families",
]
