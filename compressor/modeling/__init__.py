"""Our DeepSeekMoE implementation for transformers 5, and how it is registered and shipped.

Importing this package is cheap: the classes (and transformers' modeling stack behind them) load on first
use, and `register_when_transformers_loads` registers them with the Auto classes only once transformers'
Auto modules are imported — so CLI commands that never build a model do not pay ~3 s of imports.
"""

from __future__ import annotations

import importlib.abc
import json
import shutil
import sys
from pathlib import Path

AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekConfig",
    "AutoModel": "modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
}
_SHIPPED_FILES = ("configuration_deepseek.py", "modeling_deepseek.py")
_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODELING_AUTO = "transformers.models.auto.modeling_auto"
_LAZY = {
    "DeepseekConfig": "compressor.modeling.configuration_deepseek",
    "DeepseekModel": "compressor.modeling.modeling_deepseek",
    "DeepseekForCausalLM": "compressor.modeling.modeling_deepseek",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_config() -> None:
    """Make `AutoConfig` resolve model_type `deepseek` to our config class."""
    from transformers.models.auto.configuration_auto import AutoConfig

    from compressor.modeling.configuration_deepseek import DeepseekConfig

    AutoConfig.register(DeepseekConfig.model_type, DeepseekConfig, exist_ok=True)


def register_with_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModel(ForCausalLM)` resolve model_type `deepseek` to our classes."""
    from transformers.models.auto.modeling_auto import AutoModel, AutoModelForCausalLM

    from compressor.modeling.configuration_deepseek import DeepseekConfig
    from compressor.modeling.modeling_deepseek import DeepseekForCausalLM, DeepseekModel

    register_config()
    AutoModel.register(DeepseekConfig, DeepseekModel, exist_ok=True)
    AutoModelForCausalLM.register(DeepseekConfig, DeepseekForCausalLM, exist_ok=True)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs the registration right after transformers' Auto config / model module finishes importing."""

    def find_spec(self, name, path, target=None):
        if name not in (_CONFIG_AUTO, _MODELING_AUTO):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _ThenRegister(spec.loader, name, self)
                return spec
        return None


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader, name: str, finder: _RegisterAfterImport):
        self.loader, self.name, self.finder = loader, name, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        if self.name == _CONFIG_AUTO:
            register_config()  # the model module may still be importing (it imports this one first)
        else:
            if self.finder in sys.meta_path:
                sys.meta_path.remove(self.finder)
            register_with_auto_classes()


def register_when_transformers_loads() -> None:
    """Register with the Auto classes now if transformers' Auto modules are loaded, else as soon as they are."""
    if _MODELING_AUTO in sys.modules:
        register_with_auto_classes()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        if _CONFIG_AUTO in sys.modules:
            register_config()
        sys.meta_path.insert(0, _RegisterAfterImport())


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
    "register_when_transformers_loads",
    "write_modeling_files",
]
