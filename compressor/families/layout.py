"""Which on-disk tensors make up each routed expert, the router and the shared experts — derived from
transformers itself, never from a regex per family.

The model is built on the ``meta`` device from the config; its MoE blocks say which parameters are the
fused experts, the router and the shared experts (`FamilyAdapter` attribute names), and transformers'
checkpoint conversion mapping (the one `save_pretrained` reverts) says which tensors they are on disk:
reverting ``mlp.experts.gate_up_proj`` [E, 2I, H] gives E ``...experts.{e}.gate_proj.weight`` tensors and E
``...up_proj`` ones, whose varying integer is the expert index. A parameter that does not revert to per-expert
tensors is stored fused on disk with the expert axis first (e.g. gpt-oss). Checkpoints written either way are
recognised from their tensor names.

`to_model` / `to_disk` convert a decoder layer's tensors between the two layouts with transformers' own
conversion operations (the loader's rename-then-convert, the saver's revert).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from copy import deepcopy
from dataclasses import dataclass, field

import torch

from compressor.errors import UserError
from compressor.families.base import TensorRole

_INTEGER = re.compile(r"\d+")


@dataclass(frozen=True)
class ExpertTensor:
    """One routed-experts tensor on disk: per expert (``template`` holds ``{}`` for the expert index) or fused
    (the expert axis is ``axis``)."""

    template: str
    per_expert: bool
    axis: int = 0

    def name(self, expert: int | None = None) -> str:
        return self.template.format(int(expert)) if self.per_expert else self.template


@dataclass
class LayerLayout:
    """The MoE parts of one decoder layer on disk."""

    layer: int
    num_experts: int
    experts: list[ExpertTensor] = field(default_factory=list)
    router: dict[str, int] = field(default_factory=dict)  # on-disk name -> expert axis
    shared: list[str] = field(default_factory=list)

    def expert_names(self, expert: int) -> list[str]:
        return [t.name(expert) for t in self.experts if t.per_expert]


class CheckpointLayout:
    """The on-disk layout of one checkpoint's MoE layers and the conversions between disk and memory."""

    def __init__(self, family, config: Mapping, names=None):
        """`names`: the checkpoint's tensor names, to tell per-expert from fused-on-disk storage (default:
        what `save_pretrained` would write)."""
        from compressor.families.quantization import block_size, method

        self.family, self.config = family, dict(config)
        self.block = block_size(config)  # FP8 block scales travel with their weights
        self.mxfp4 = method(config) == "mxfp4"  # fused experts stored as _blocks / _scales
        self.model = meta_model(family, config)
        self._renamings, self._converters = _conversions(self.model)
        state = self.model.state_dict()
        self._layer_of: dict[str, int] = {}
        disk = {}
        for layer in range(family.num_layers(config)):
            prefix = family.decoder_layer_path(layer) + "."
            layer_disk = self._revert({k: v for k, v in state.items() if k.startswith(prefix)})
            self._layer_of.update(dict.fromkeys(layer_disk, layer))
            disk.update(layer_disk)
        disk.update(self._revert({k: v for k, v in state.items() if not k.startswith(_layers_prefix(family))}))
        self.shapes = {name: tuple(t.shape) for name, t in disk.items()}  # on-disk shapes, as saved
        self.expected = set(disk)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.expected.discard(f"{family.lm_head_path}.weight")
        names = set(names) if names is not None else set(self.expected)
        self.layers: dict[int, LayerLayout] = {}
        self._roles: dict[str, TensorRole] = {}
        for layer in family.moe_layers(config):
            self.layers[layer] = self._layer_layout(layer, state, names)

    # -- derivation -----------------------------------------------------------------------------------

    def _revert(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, dict(state))

    def _layer_layout(self, layer: int, state, names: set[str]) -> LayerLayout:
        family = self.family
        block_path = f"{family.decoder_layer_path(layer)}.{family.block_attr}"
        count = family.num_experts(self.config, layer)
        layout = LayerLayout(layer, count)
        experts_prefix = f"{block_path}.{family.experts_attr}."
        router_prefixes = [f"{block_path}.{family.router_attr}.", f"{block_path}.{family.correction_bias_path}"]
        shared_prefixes = [f"{block_path}.{name}." for name in (*family.shared_attrs, family.shared_gate_attr) if name]
        for param, meta in state.items():
            if param.startswith(experts_prefix):
                layout.experts += self._expert_tensors(param, meta, count, layer, names)
            elif any(param.startswith(p) or param == p for p in router_prefixes):
                for name, tensor in self._revert({param: meta}).items():
                    layout.router[name] = _expert_axis(tuple(tensor.shape), count, name)
                    self._roles[name] = TensorRole("router", layer, None)
            elif any(param.startswith(p) for p in shared_prefixes):
                for name in self._revert({param: meta}):
                    layout.shared.append(name)
                    self._roles[name] = TensorRole("shared_expert", layer, None)
        if not layout.experts:
            raise UserError(f"{family.name}: layer {layer} has no routed experts under {experts_prefix}*")
        return layout

    def _expert_tensors(self, param: str, meta: torch.Tensor, count: int, layer: int, names: set[str]):
        reverted = self._revert({param: meta})
        if self.mxfp4 and f"{param}_blocks" in names:
            return self._mxfp4_tensors(param, meta, reverted, layer)
        if param in names or set(reverted) == {param}:  # fused on disk: the expert axis comes first
            for name in reverted:
                if name != param:
                    self.expected.discard(name)
                    self.shapes.pop(name, None)
            self.expected.add(param)
            self.shapes[param] = tuple(meta.shape)
            self._layer_of[param] = layer
            self._roles[param] = TensorRole("expert", layer, None)
            return [ExpertTensor(param, per_expert=False, axis=0)]
        templates = _by_expert_index(list(reverted), count)
        if templates is None:
            raise UserError(f"{self.family.name}: cannot tell the expert index in the on-disk names of {param} "
                            f"(e.g. {next(iter(reverted))})")
        from compressor.families.quantization import scale_name

        tensors = []
        for template, by_expert in templates.items():
            scaled = [scale_name(name) in names for name in by_expert.values()] if self.block else []
            if any(scaled) and not all(scaled):
                missing = next(name for name, s in zip(by_expert.values(), scaled) if not s)
                raise UserError(f"FP8 checkpoint: {missing} has no scale tensor {scale_name(missing)}")
            for name_template in [template, *([scale_name(template)] if any(scaled) else [])]:
                tensors.append(ExpertTensor(name_template, per_expert=True))
                for expert in by_expert:
                    self._roles[name_template.format(expert)] = TensorRole("expert", layer, expert)
        return tensors

    def _mxfp4_tensors(self, param: str, meta: torch.Tensor, reverted, layer: int) -> list[ExpertTensor]:
        """A fused experts parameter [E, in, out] stored as MXFP4 ``_blocks`` [E, out, in / 32, 16] and ``_scales``
        [E, out, in / 32]."""
        from compressor.families.quantization import MXFP4_PARTS

        experts, inputs, outputs = meta.shape
        for name in reverted:
            self.expected.discard(name)
            self.shapes.pop(name, None)
        shapes = dict(zip(MXFP4_PARTS, ((experts, outputs, inputs // 32, 16), (experts, outputs, inputs // 32))))
        tensors = []
        for suffix, shape in shapes.items():
            name = param + suffix
            self.expected.add(name)
            self.shapes[name] = shape
            self._layer_of[name] = layer
            self._roles[name] = TensorRole("expert", layer, None)
            tensors.append(ExpertTensor(name, per_expert=False, axis=0))
        return tensors

    # -- questions ------------------------------------------------------------------------------------

    def classify(self, name: str) -> TensorRole:
        """What on-disk tensor `name` is."""
        return self._roles.get(name) or TensorRole("other", self._layer_of.get(name), None)

    def layer_of(self, name: str) -> int | None:
        """The decoder layer on-disk tensor `name` belongs to (None outside the layers or when unknown)."""
        return self._layer_of.get(name)

    def validate(self, reader) -> None:
        """UserError when the checkpoint's tensors do not make this model: a missing tensor, an expert the
        config has no room for, a router or expert tensor whose shape disagrees with the expert count."""
        names = set(reader.names())
        missing = sorted(self.expected - names)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise UserError(f"checkpoint does not match its config.json ({self.family.name}): missing "
                            f"{', '.join(missing[:3])}{more}")
        if self.block:
            from compressor.families.quantization import FP8_DTYPES, scale_name

            unscaled = sorted(n for n in names if reader.info(n).dtype in FP8_DTYPES and scale_name(n) not in names)
            if unscaled:
                raise UserError(f"FP8 checkpoint: {unscaled[0]} has no scale tensor {scale_name(unscaled[0])}")
        surplus = sorted(n for n in names - self.expected - self._roles.keys() if _looks_like_expert(n, self.layers))
        if surplus:
            raise UserError(f"checkpoint holds {surplus[0]}, which its config.json ({self.family.name}) has no "
                            "expert for")
        for layer, layout in sorted(self.layers.items()):
            for name, axis in layout.router.items():
                shape = tuple(reader.info(name).shape)
                if len(shape) <= axis or shape[axis] != layout.num_experts:
                    raise UserError(f"{name} has shape {list(shape)}, but config.json ({self.family.name}) gives "
                                    f"layer {layer} {layout.num_experts} routed experts")
            for tensor in layout.experts:
                if tensor.per_expert:
                    shapes = {tuple(reader.info(tensor.name(e)).shape) for e in range(layout.num_experts)}
                    if len(shapes) > 1:
                        raise UserError(f"layer {layer}: the routed experts' {tensor.template.format('*')} tensors "
                                        f"differ in shape ({', '.join(str(list(s)) for s in sorted(shapes))})")
                elif tuple(reader.info(tensor.name()).shape)[:1] != (layout.num_experts,):
                    raise UserError(f"{tensor.name()} has shape {list(reader.info(tensor.name()).shape)}, but "
                                    f"config.json gives layer {layer} {layout.num_experts} routed experts")
        for name in sorted(names & self.expected):
            if tuple(reader.info(name).shape) != self.shapes[name]:
                raise UserError(f"{name} has shape {list(reader.info(name).shape)}, but config.json "
                                f"({self.family.name}) gives it {list(self.shapes[name])}")

    # -- conversions ------------------------------------------------------------------------------------

    def to_model(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """On-disk tensors (any subset of whole parameters, e.g. one decoder layer) -> the model's state-dict
        names and layout, with transformers' loading conversions."""
        from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

        by_pattern = {pattern: c for c in self._converters for pattern in c.source_patterns}
        pending: dict[str, WeightConverter] = {}
        out: dict[str, torch.Tensor] = {}
        for name, tensor in sorted(tensors.items(), key=lambda item: dot_natural_key(item[0])):
            target, pattern = rename_source_key(name, self._renamings, self._converters)
            if pattern is None:
                out[target] = tensor
                continue
            converter = pending.setdefault(target, deepcopy(by_pattern[pattern]))
            converter.add_tensor(target, name, pattern, tensor)
        for first, converter in pending.items():
            for target, value in converter.convert(first, model=self.model, config=self.model.config).items():
                out[target] = value[0] if isinstance(value, list) else value
        return out

    def to_disk(self, state: Mapping[str, torch.Tensor], model=None) -> dict[str, torch.Tensor]:
        """The model's state-dict tensors -> on-disk names and layout, as `save_pretrained` writes them (for a
        checkpoint that stores experts fused, fused). `model`: the model they belong to (default: this layout's)."""
        from transformers.core_model_loading import revert_weight_conversion

        fused = {name for layout in self.layers.values() for t in layout.experts if not t.per_expert
                 for name in [t.template]}
        keep = {name: tensor for name, tensor in state.items() if name in fused}
        rest = revert_weight_conversion(model or self.model, {n: t for n, t in state.items() if n not in fused})
        return {**rest, **keep}


def _layers_prefix(family) -> str:
    return family.decoder_layer_path(0).rsplit(".", 1)[0] + "."


def meta_model(family, config: Mapping):
    """The family's causal LM for `config`, built on the meta device (no memory, no weights)."""
    config_object = family.build_config(config)
    with torch.device("meta"):
        return family.model_class(config)(config_object)


def _conversions(model):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

    conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    return ([c for c in conversions if isinstance(c, WeightRenaming)],
            [c for c in conversions if isinstance(c, WeightConverter)])


def _by_expert_index(names: list[str], count: int) -> dict[str, dict[int, str]] | None:
    """The per-expert tensor names grouped as {template with ``{}`` for the expert index: {index: name}}: the
    integer position (same in every name) whose values run over 0..count-1 in every group; None if none does."""
    positions = {len(_INTEGER.findall(name)) for name in names}
    if len(positions) != 1:
        return None
    for position in reversed(range(positions.pop())):
        groups: dict[str, dict[int, str]] = {}
        for name in names:
            match = list(_INTEGER.finditer(name))[position]
            template = name[: match.start()] + "{}" + name[match.end():]
            groups.setdefault(template, {})[int(match.group())] = name
        if all(sorted(group) == list(range(count)) for group in groups.values()):
            return groups
    return None


def _expert_axis(shape: tuple[int, ...], count: int, name: str) -> int:
    for axis, size in enumerate(shape):
        if size == count:
            return axis
    raise UserError(f"{name} of shape {list(shape)} has no axis of {count} experts")


def _looks_like_expert(name: str, layers: Mapping[int, LayerLayout]) -> bool:
    """Whether `name` has the shape of a per-expert tensor name of some MoE layer (an index the layer lacks)."""
    for layout in layers.values():
        for tensor in layout.experts:
            if tensor.per_expert and re.fullmatch(re.escape(tensor.template).replace(r"\{\}", r"\d+"), name):
                return True
    return False

