"""Run a checkpoint one decoder layer at a time: skeleton on `meta`, each layer materialised from the shards.

Peak memory is about one decoder layer plus the cached activations (which spill to disk past a budget),
so checkpoints larger than RAM (or GPU memory) can be profiled, compensated and validated.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

TensorSource = Callable[[int], dict[str, torch.Tensor]]


class ActivationStore:
    """Hidden states of every batch between layers: in RAM up to a budget, then spilled to disk."""

    def __init__(self, budget_bytes: int = 2 * 2**30):
        self.budget = budget_bytes
        self.items: list[torch.Tensor | Path | None] = []
        self.in_memory = 0
        self._dir: tempfile.TemporaryDirectory | None = None

    def __len__(self) -> int:
        return len(self.items)

    def put(self, index: int, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        while len(self.items) <= index:
            self.items.append(None)
        old = self.items[index]
        if isinstance(old, torch.Tensor):
            self.in_memory -= old.numel() * old.element_size()
        if self.in_memory + nbytes <= self.budget:
            self.items[index] = tensor
            self.in_memory += nbytes
            return
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="moe-compress-activations-")
        path = Path(self._dir.name) / f"{index}.pt"
        torch.save(tensor.cpu(), path)
        self.items[index] = path

    def get(self, index: int, device) -> torch.Tensor:
        item = self.items[index]
        return item if isinstance(item, torch.Tensor) else torch.load(item, map_location=device)

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


class LayerwiseModel:
    """A model skeleton on `meta` whose decoder layers are materialised one at a time.

    `config` is the config dict of the model to build (e.g. a pruned one), and `tensors_of_layer(layer)`
    returns that layer's tensors by on-disk name (e.g. read from the source and mapped to pruned names).
    """

    def __init__(self, family, config: dict, device: torch.device, dtype: torch.dtype):
        self.family, self.config, self.device, self.dtype = family, config, device, dtype
        config_object = family.build_config(config)
        with torch.device("meta"):
            self.model = family.model_class(config)(config_object)
        self.model.eval()

    @property
    def num_layers(self) -> int:
        return self.family.num_layers(self.config)

    def layer(self, layer: int) -> torch.nn.Module:
        return self.model.get_submodule(self.family.layer_module_name(layer))

    def load_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Materialise decoder layer `layer` from its tensors (on-disk names of this model's layout)."""
        module = self.layer(layer)
        module.to_empty(device=self.device)
        module.load_state_dict(self.family.layer_state_dict(self.config, layer, tensors), strict=True)
        return module.to(self.dtype)

    def release_layer(self, layer: int) -> None:
        self.layer(layer).to("meta")

    def run_layer(self, module: torch.nn.Module, hidden: torch.Tensor, attention_mask) -> torch.Tensor:
        return self.family.run_decoder_layer(self.model, module, hidden, attention_mask)

    def load_head(self, reader) -> Callable[[torch.Tensor], torch.Tensor]:
        """Materialise the final norm and LM head; returns hidden states after the last layer -> logits."""
        modules = []
        for path in (self.family.final_norm_module, self.family.lm_head_module):
            module = self.model.get_submodule(path)
            module.to_empty(device=self.device)
            state = {}
            for key in module.state_dict():
                name = f"{path}.{key}"
                if name not in reader and path == self.family.lm_head_module and self.config.get("tie_word_embeddings"):
                    name = self.family.embedding_tensor_name
                state[key] = reader.get(name)
            module.load_state_dict(state, strict=True)
            modules.append(module.to(self.dtype))
        norm, head = modules
        return lambda hidden: head(norm(hidden))


def layer_tensors(reader, family, layer: int) -> dict[str, torch.Tensor]:
    """All on-disk tensors of decoder layer `layer` (the layer straddling shards is fine)."""
    prefix = family.layer_prefix(layer)
    return {name: reader.get(name) for name in reader.names() if name.startswith(prefix)}
