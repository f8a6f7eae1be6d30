"""Model-family adapters: what stages need to know about a family, behind one interface.

`detect_family(config)` picks the adapter from ``config["model_type"]``; `get_family(name)` by family name.
"""

from __future__ import annotations

from collections.abc import Mapping

from compressor.errors import UserError
from compressor.families.base import FamilyAdapter, RouterSpec, TensorRole
from compressor.families.deepseek_moe import DeepseekMoEFamily
from compressor.families.deepseek_v2 import DeepseekV2Family

FAMILIES: dict[str, FamilyAdapter] = {
    family.name: family for family in (DeepseekMoEFamily(), DeepseekV2Family())
}
_BY_MODEL_TYPE: dict[str, FamilyAdapter] = {
    model_type: family for family in FAMILIES.values() for model_type in family.model_types
}


def supported_families() -> str:
    """``"deepseek_moe (model_type deepseek), deepseek_v2 (model_type deepseek_v2)"``."""
    return ", ".join(f"{name} (model_type {', '.join(f.model_types)})" for name, f in FAMILIES.items())


def detect_family(config: Mapping) -> FamilyAdapter:
    """The adapter for a config dict (by ``model_type``); UserError listing the supported families otherwise."""
    model_type = config.get("model_type") if isinstance(config, Mapping) else None
    family = _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        what = f"model_type {model_type!r}" if model_type is not None else "a config.json without model_type"
        raise UserError(f"unsupported model: {what}; supported families: {supported_families()}")
    return family


def get_family(name: str) -> FamilyAdapter:
    """The adapter named `name` (e.g. ``"deepseek_moe"``); a model_type is accepted too."""
    family = FAMILIES.get(name) or _BY_MODEL_TYPE.get(name)
    if family is None:
        raise UserError(f"unknown model family {name!r}; supported families: {supported_families()}")
    return family


__all__ = [
    "FAMILIES",
    "DeepseekMoEFamily",
    "DeepseekV2Family",
    "FamilyAdapter",
    "RouterSpec",
    "TensorRole",
    "detect_family",
    "get_family",
    "supported_families",
]
