"""How each source tensor maps into the pruned checkpoint: dropped, renamed, router rows sliced, or copied."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from compressor.io import TensorSpec


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output checkpoint and where its data comes from."""

    name: str  # name in the output
    source: str  # name in the source checkpoint
    action: Literal["copy", "slice_rows"]
    spec: TensorSpec
    rows: tuple[int, ...] | None = None  # kept rows, for router tensors


class TensorMapping:
    """The pruned checkpoint's tensors, derived from the source's names/headers and the kept experts."""

    def __init__(self, family, kept: dict[int, list[int]]):
        self.family = family
        self.kept = {int(layer): list(experts) for layer, experts in kept.items()}
        self.new_index = {layer: {old: new for new, old in enumerate(experts)} for layer, experts in self.kept.items()}

    def map(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> OutputTensor | None:
        """The output tensor for source tensor `name`, or None when it is dropped."""
        role = self.family.classify(name)
        if role.kind == "expert" and role.layer in self.kept:
            new = self.new_index[role.layer].get(role.expert)
            if new is None:
                return None
            out = self.family.expert_tensor_name(role.layer, new, role.suffix)
            return OutputTensor(out, name, "copy", TensorSpec(out, dtype, shape))
        if role.kind == "router" and role.layer in self.kept:
            rows = tuple(self.kept[role.layer])
            return OutputTensor(name, name, "slice_rows", TensorSpec(name, dtype, (len(rows), *shape[1:])), rows)
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
            if mapped is None:
                continue
            result[mapped.name] = tensor[list(mapped.rows)] if mapped.action == "slice_rows" else tensor
        return result
