"""Our DeepSeekMoE implementation for transformers 5, and how it is registered and shipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from compressor.modeling.configuration_deepseek import DeepseekConfig
from compressor.modeling.modeling_deepseek import DeepseekForCausalLM, DeepseekModel

AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekConfig",
    "AutoModel": "modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
}
_SHIPPED_FILES = ("configuration_deepseek.py", "modeling_deepseek.py")


def register_with_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModel(ForCausalLM)` resolve model_type `deepseek` to our classes."""
    AutoConfig.register(DeepseekConfig.model_type, DeepseekConfig, exist_ok=True)
    AutoModel.register(DeepseekConfig, DeepseekModel, exist_ok=True)
    AutoModelForCausalLM.register(DeepseekConfig, DeepseekForCausalLM, exist_ok=True)


def write_modeling_files(directory: str | Path) -> None:
    """Copy our self-contained config/modeling files into `directory` and point its config's `auto_map` at them.

    The checkpoint then loads with `trust_remote_code=True` where moe-compress is not installed.
    """
    directory = Path(directory)
    here = Path(__file__).parent
    for name in _SHIPPED_FILES:
        shutil.copyfile(here / name, directory / name)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = dict(AUTO_MAP)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


__all__ = [
    "AUTO_MAP",
    "DeepseekConfig",
    "DeepseekForCausalLM",
    "DeepseekModel",
    "register_with_auto_classes",
    "write_modeling_files",
]
