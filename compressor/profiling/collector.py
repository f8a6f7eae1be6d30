"""Accumulate routing statistics from a model's MoE layers (fp64 accumulators, padding excluded)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compressor.families.moe_block import MoEBlock
from compressor.profiling.schema import LayerStatistics


class LayerAccumulator:
    """Sums for one MoE layer: selected / top1 / gate_mass / reap per expert, and the single-vs-ensemble cosines."""

    def __init__(self, n_experts: int, device: torch.device | str = "cpu"):
        zeros = lambda: torch.zeros(n_experts, dtype=torch.float64, device=device)  # noqa: E731
        self.selected, self.top1, self.gate_mass, self.reap = zeros(), zeros(), zeros(), zeros()
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # routed cos, layer cos, tokens
        self._pending = None

    def observe_routing(self, valid, topk_idx, topk_weight, expert_outputs, routed_output):
        """Called from the MoE block with the routing of every token (slot 0 = highest weight)."""
        if bool(valid.all()):  # packed batches: no padding, so no copies through boolean indexing
            valid = slice(None)
        idx, weight, outputs = topk_idx[valid], topk_weight[valid].double(), expert_outputs[valid]
        flat_idx = idx.reshape(-1)
        self.selected.index_add_(0, flat_idx, torch.ones_like(flat_idx, dtype=torch.float64))
        self.top1.index_add_(0, idx[:, 0], torch.ones(idx.shape[0], dtype=torch.float64, device=idx.device))
        self.gate_mass.index_add_(0, flat_idx, weight.reshape(-1))
        norms = torch.linalg.vector_norm(outputs.float(), dim=-1).double()
        self.reap.index_add_(0, flat_idx, (weight * norms).reshape(-1))
        top1_part = outputs[:, 0].float() * topk_weight[valid][:, :1].float()
        routed = routed_output[valid].float()
        self.sums[0] += F.cosine_similarity(top1_part, routed, dim=-1, eps=1e-12).double().sum()
        self.sums[2] += idx.shape[0]
        self._pending = (valid, routed, top1_part)

    def observe_layer_output(self, layer_output):
        """Called with the decoder layer's output: compares it with the same output under top-1 routing."""
        valid, routed, top1_part = self._pending
        self._pending = None
        full = layer_output.reshape(-1, layer_output.shape[-1])[valid].float()
        single = full - routed + top1_part
        self.sums[1] += F.cosine_similarity(single, full, dim=-1, eps=1e-12).double().sum()

    def tensors(self) -> list[torch.Tensor]:
        """The accumulators, for all-reducing across ranks."""
        return [self.selected, self.top1, self.gate_mass, self.reap, self.sums]

    def to_statistics(self) -> LayerStatistics:
        return LayerStatistics(
            selected=[int(round(v)) for v in self.selected.tolist()],
            top1=[int(round(v)) for v in self.top1.tolist()],
            gate_mass=self.gate_mass.tolist(),
            reap=self.reap.tolist(),
            top1_routed_cosine_sum=float(self.sums[0]),
            top1_layer_cosine_sum=float(self.sums[1]),
            cosine_tokens=int(round(float(self.sums[2]))),
        )


class RoutingCollector:
    """Attaches accumulators to every MoE layer of a model through the MoE-block interface.

    Set `valid` (a flat bool mask of real tokens, row-major over the batch) before each forward pass.
    """

    def __init__(self, family, config: dict, device="cpu"):
        self.family, self.config = family, config
        self.layers = {
            layer: LayerAccumulator(family.num_experts(config, layer), device) for layer in family.moe_layers(config)
        }
        self.valid = None
        self._detach = []

    def attach(self, model: torch.nn.Module, layers=None) -> None:
        """Hook the MoE blocks (and decoder layers) of `layers` (default: all) in `model`."""
        for layer in self.layers if layers is None else layers:
            decoder_layer = model.get_submodule(self.family.decoder_layer_path(layer))
            self._detach.append(self.attach_layer(layer, decoder_layer))

    def attach_layer(self, layer: int, decoder_layer: torch.nn.Module):
        """Observe decoder layer `layer` (its MoE block's routing and its output); returns a detach function."""
        accumulator = self.layers[layer]

        def on_routing(routing, expert_outputs, routed_output, **_):
            accumulator.observe_routing(self.valid, routing.indices, routing.weights, expert_outputs, routed_output)

        def on_output(_module, _inputs, output):
            accumulator.observe_layer_output(output[0] if isinstance(output, tuple) else output)

        remove_observer = MoEBlock(self.family, self.config, layer, decoder_layer).observe(on_routing)
        handle = decoder_layer.register_forward_hook(on_output)

        def detach():
            remove_observer()
            handle.remove()

        return detach

    def detach(self) -> None:
        for detach in self._detach:
            detach()
        self._detach = []

    def statistics(self) -> dict[str, LayerStatistics]:
        return {str(layer): acc.to_statistics() for layer, acc in self.layers.items()}
