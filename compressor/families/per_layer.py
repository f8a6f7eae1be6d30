"""Per-layer expert counts for transformers-native MoE families (whose classes hold one count per model).

`per_layer_class(Base, count_key)` is `Base` (e.g. Qwen3MoeForCausalLM) whose MoE layers listed in the config's
``n_routed_experts_per_layer`` get their MoE block rebuilt — the family's own block class, built from a copy of
the config with `count_key` set to the layer's count. The same code ships into outputs as
``modeling_moe_compress.py`` (`write_per_layer_modeling`), so they load with ``trust_remote_code=True`` where
moe-compress is not installed; the class is registered with the family's checkpoint conversion (per-expert
tensors on disk), as transformers applies conversions to custom classes only when registered by name.
"""

from __future__ import annotations

import json
from pathlib import Path

MODULE_FILE = "modeling_moe_compress.py"
_SOURCE_START, _SOURCE_END = "# --- shipped source start", "# --- shipped source end"

# --- shipped source start
import copy  # noqa: E402

PER_LAYER_KEY = "n_routed_experts_per_layer"
_CLASSES = {}


def per_layer_class(base, count_key, block_attr="mlp", name=None):
    """`base` (a transformers causal-LM class) whose MoE blocks take their expert count from PER_LAYER_KEY."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

    key = (base, count_key, block_attr)
    if key in _CLASSES:
        return _CLASSES[key]

    def __init__(self, config):
        base.__init__(self, config)
        for layer, count in (getattr(config, PER_LAYER_KEY, None) or {}).items():
            decoder_layer = self.model.layers[int(layer)]
            layer_config = copy.copy(config)
            setattr(layer_config, count_key, int(count))
            setattr(decoder_layer, block_attr, type(getattr(decoder_layer, block_attr))(layer_config))
        self.post_init()

    cls = type(name or f"{base.__name__}PerLayer", (base,), {"__init__": __init__})
    conversion = get_checkpoint_conversion_mapping(base.config_class.model_type)
    if conversion:
        register_checkpoint_conversion_mapping(cls.__name__, conversion, overwrite=True)
    _CLASSES[key] = cls
    return cls
# --- shipped source end


def write_per_layer_modeling(directory: Path, base, count_key: str, block_attr: str = "mlp") -> None:
    """Ship the per-layer class for `base` into `directory` and point config.json's auto_map at it."""
    source = Path(__file__).read_text()
    body = source[source.index(f"\n{_SOURCE_START}\n") + len(_SOURCE_START) + 2:source.index(f"\n{_SOURCE_END}\n")]
    name = f"{base.__name__}PerLayer"
    text = "\n".join([
        f'"""{base.__name__} with per-layer expert counts ({PER_LAYER_KEY} in config.json), written by moe-compress.',
        "",
        'Load with trust_remote_code=True; needs only torch and transformers."""',
        "",
        f"from {base.__module__} import {base.__name__} as _Base",
        "",
        body.rstrip(),
        "",
        "",
        f"{name} = per_layer_class(_Base, {count_key!r}, {block_attr!r}, {name!r})",
        "",
    ])
    (Path(directory) / MODULE_FILE).write_text(text)
    config_path = Path(directory) / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": f"{MODULE_FILE.removesuffix('.py')}.{name}"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
