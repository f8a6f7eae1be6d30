"""How each source tensor maps into the pruned checkpoint: copied, renamed (a kept expert renumbered), sliced along
its expert axis (routers, experts fused on disk) or dropped (a removed expert) — from the checkpoint's layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from compressor.families.layout import CheckpointLayout
from compressor.families.quantization import MXFP4_PARTS
from compressor.io import TensorSpec


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output checkpoint and where its data comes from."""

    name: str  # name in the output
    source: str  # name in the source checkpoint
    action: Literal["copy", "slice"]
    spec: TensorSpec
    keep: tuple[int, ...] | None = None  # kept experts in their new order, for "slice"
    axis: int = 0  # the expert axis, for "slice"

    def slice(self, tensor: torch.Tensor) -> torch.Tensor:
        """The source tensor's kept part (for "slice"), contiguous."""
        return tensor.index_select(self.axis, torch.tensor(self.keep, device=tensor.device)).contiguous()


class TensorMapping:
    """The pruned checkpoint's tensors, derived from the source's layout and the kept experts."""

    def __init__(self, layout: CheckpointLayout, kept: dict[int, list[int]]):
        self.source_layout = layout
        self.kept = {int(layer): list(experts) for layer, experts in kept.items()}
        self.new_index = {layer: {old: new for new, old in enumerate(experts)} for layer, experts in self.kept.items()}
        self._per_expert: dict[str, tuple[int, int, str]] = {}  # source name -> (layer, old expert, template)
        self._sliced: dict[str, tuple[int, int]] = {}  # source name -> (layer, expert axis)
        for layer, layer_layout in layout.layers.items():
            for tensor in layer_layout.experts:
                if tensor.per_expert:
                    for expert in range(layer_layout.num_experts):
                        self._per_expert[tensor.name(expert)] = (layer, expert, tensor.template)
                else:
                    self._sliced[tensor.name()] = (layer, tensor.axis)
                    for suffix in MXFP4_PARTS if layout.mxfp4 and tensor.name().endswith(MXFP4_PARTS) else ():
                        # the parameter dequantized from its MXFP4 blocks and scales (layer-by-layer runs)
                        self._sliced[tensor.name().removesuffix(suffix)] = (layer, tensor.axis)
            for name, axis in layer_layout.router.items():
                self._sliced[name] = (layer, axis)

    def map(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> OutputTensor | None:
        """The output tensor for source tensor `name`, or None when it is dropped."""
        if name in self._per_expert:
            layer, expert, template = self._per_expert[name]
            new = self.new_index[layer].get(expert)
            if new is None:
                return None
            out = template.format(new)
            return OutputTensor(out, name, "copy", TensorSpec(out, dtype, shape))
        if name in self._sliced:
            layer, axis = self._sliced[name]
            keep = tuple(self.kept[layer])
            new_shape = (*shape[:axis], len(keep), *shape[axis + 1:])
            return OutputTensor(name, name, "slice", TensorSpec(name, dtype, new_shape), keep, axis)
        return OutputTensor(name, name, "copy", TensorSpec(name, dtype, shape))

    def plan(self, reader) -> list[OutputTensor]:
        """Every output tensor, in the source's on-disk order (shard by shard, by offset)."""
        outputs = []
        for shard in reader.shards():
            for name in reader.tensors_in_shard(shard):
                info = reader.info(name)
                mapped = self.map(name, info.dtype, tuple(info.shape))
                if mapped is not None:
                    outputs.append(mapped)
        return outputs

    def layer_tensors(self, layer: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A decoder layer's source tensors -> its pruned tensors (output names), for running the pruned layer."""
        result = {}
        for name, tensor in tensors.items():
            mapped = self.map(name, tensor.dtype, tuple(tensor.shape))
            if mapped is not None:
                result[mapped.name] = mapped.slice(tensor) if mapped.action == "slice" else tensor
        return result
