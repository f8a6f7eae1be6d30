"""Early decoding ("logit lens") of single vs ensemble experts, through the MoE-block interface.

For every MoE layer L and every real token that has a next token: h_k is the residual stream after decoder layer L
of the original model; h_j the same with L's routed part reduced to its j highest-weight experts, their routed
weights unchanged (shared experts kept, earlier layers original): h_j = h_k - routed + sum of the first j slots.
Each is decoded as p(h) = softmax(lm_head(final_norm(h))) — with the final norm, which the paper's notebooks left
out — and compared with p(h_k), the true next token and the model's final prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from compressor import __version__
from compressor.data.batching import Batch, batches
from compressor.data.sources import load_source
from compressor.errors import UserError
from compressor.families import open_checkpoint
from compressor.families.moe_block import MoEBlock
from compressor.io.resolve import resolve_model
from compressor.lens.schema import LensDomain, LensLayer, LensReport, LensSettings
from compressor.profiling.schema import ModelIdentity, SourceDescription, config_hash
from compressor.runtime import (
    CheckpointTensors, Distributed, ForwardOptions, LayerwiseModel, resolve_device, resolve_dtype, run_layer_by_layer,
    tokenize_domains,
)


@dataclass
class LensOptions:
    max_tokens: int | None = 16384  # per domain
    forward: ForwardOptions = field(default_factory=ForwardOptions)
    revision: str | None = None
    progress: bool = True


class _LayerSums:
    """fp64 sums for one domain and MoE layer (all-reduced across ranks)."""

    def __init__(self, k: int, device):
        self.values = torch.zeros(6, dtype=torch.float64, device=device)  # kl1, agree1, cos, acc_k, acc_1, final
        self.kl_by_experts = torch.zeros(k, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(1, dtype=torch.float64, device=device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.values, self.kl_by_experts, self.tokens]

    def result(self) -> LensLayer:
        n = max(float(self.tokens), 1.0)
        kl1, agree, cos, acc_k, acc_1, final = (float(v) / n for v in self.values)
        return LensLayer(kl_topk_top1=kl1, top1_agreement=agree, cosine=cos, early_accuracy_topk=acc_k,
                         early_accuracy_top1=acc_1, final_agreement_topk=final,
                         kl_by_experts=[float(v) / n for v in self.kl_by_experts])


_ROWS_PER_CHUNK = 256


class _BatchLens:
    """Observes the MoE layers of one batch: accumulates every metric but the final agreement, which waits for the
    model's final prediction (`finish`)."""

    def __init__(self, sums: dict[int, _LayerSums], head, batch: Batch, device):
        self.sums, self.head = sums, head
        ids = batch.input_ids.to(device)
        valid = torch.ones_like(ids, dtype=torch.bool) if batch.attention_mask is None \
            else batch.attention_mask.to(device).bool()
        has_next = torch.zeros_like(valid)
        has_next[:, :-1] = valid[:, :-1] & valid[:, 1:]
        self.rows = has_next.reshape(-1)  # flat positions that have a next token
        self.next_tokens = ids[:, 1:][has_next[:, :-1]]
        self.predictions: dict[int, torch.Tensor] = {}  # layer -> argmax p(h_k) at those positions
        self._partial: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_routing(self, layer: int, routing, expert_outputs, routed_output, **_) -> None:
        weighted = expert_outputs[self.rows].float() * routing.weights[self.rows].unsqueeze(-1).float()
        self._partial[layer] = weighted.cumsum(dim=1), routed_output[self.rows].float()

    def on_layer_output(self, layer: int, output: torch.Tensor) -> None:
        cumulative, routed = self._partial.pop(layer)
        h_k = output.reshape(-1, output.shape[-1])[self.rows].float()
        sums = self.sums[layer]
        k = cumulative.shape[1]
        predictions = []
        # row chunks keep the [rows, vocab] intermediates small (cache-sized, bounded memory at any vocabulary)
        for start in range(0, h_k.shape[0], _ROWS_PER_CHUNK):
            rows = slice(start, start + _ROWS_PER_CHUNK)
            hk, target = h_k[rows], self.next_tokens[rows]
            log_k = self._decode(hk)
            p_k = log_k.exp()
            prediction = log_k.argmax(-1)
            for j in range(1, k + 1):
                h_j = hk - routed[rows] + cumulative[rows, j - 1] if j < k else hk
                log_j = self._decode(h_j) if j < k else log_k  # j = k is the ensemble itself
                kl = torch.linalg.vecdot(p_k, log_k - log_j).double().sum()
                sums.kl_by_experts[j - 1] += kl
                if j == 1:
                    top1 = log_j.argmax(-1)
                    sums.values[0] += kl
                    sums.values[1] += (top1 == prediction).sum()
                    sums.values[2] += F.cosine_similarity(hk, h_j, dim=-1, eps=1e-12).double().sum()
                    sums.values[4] += (top1 == target).sum()
            sums.values[3] += (prediction == target).sum()
            predictions.append(prediction)
        sums.tokens += h_k.shape[0]
        self.predictions[layer] = torch.cat(predictions)

    def _decode(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = next(self.head[1].parameters()).dtype
        return self.head[1](self.head[0](hidden.to(dtype))).float().log_softmax(-1)

    def finish(self, final_logits: torch.Tensor) -> None:
        """Compare every layer's prediction with the model's (final logits of the whole batch)."""
        final = final_logits.reshape(-1, final_logits.shape[-1])[self.rows].argmax(-1)
        for layer, prediction in self.predictions.items():
            self.sums[layer].values[5] += (prediction == final).sum()


def _attach(family, config, layer: int, decoder_layer, lens_for) -> callable:
    """Observe decoder layer `layer` for the lens of the current batch (`lens_for()`); returns a detach function."""

    def on_routing(**kwargs):
        lens_for().on_routing(layer, **kwargs)

    def on_output(_module, _inputs, output):
        lens_for().on_layer_output(layer, output[0] if isinstance(output, tuple) else output)

    remove = MoEBlock(family, config, layer, decoder_layer).observe(on_routing)
    handle = decoder_layer.register_forward_hook(on_output)

    def detach():
        remove()
        handle.remove()

    return detach


def lens_model(model: str, sources: dict[str, str], options: LensOptions | None = None) -> LensReport:
    """The lens of `model` (local directory or Hub id) on each NAME=SOURCE (default split: evaluation)."""
    options = options or LensOptions()
    forward = options.forward
    if forward.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (a token and its next), got {forward.seq_len}")
    device, dtype = resolve_device(forward.device), resolve_dtype(forward.dtype)
    loaded = {name: load_source(spec, default_split="evaluation", text_field=forward.text_field)
              for name, spec in sources.items()}
    model_dir, revision = resolve_model(model, options.revision)
    checkpoint = open_checkpoint(model_dir)
    family, config = checkpoint.family, checkpoint.config
    moe_layers = family.moe_layers(config)
    if not moe_layers:
        raise UserError(f"{model} has no MoE layers: the lens compares single and ensemble experts")
    sequences, pad = tokenize_domains(model_dir, config, loaded, forward.seq_len, options.max_tokens, min_length=2)
    dist = Distributed(device)
    device = dist.device
    sums = {name: {layer: _LayerSums(family.top_k(config), device) for layer in moe_layers} for name in sequences}
    work = [(name, batch) for name, rows in sequences.items()
            for index, batch in enumerate(batches(rows, forward.batch_size, pad)) if dist.mine(index)]
    run = _run_layerwise if forward.layerwise else _run_whole
    try:
        run(checkpoint, work, sums, options, device, dtype, dist)
        for layers in sums.values():
            dist.all_reduce([t for s in layers.values() for t in s.tensors()])
    finally:
        dist.close()
    checkpoint.close()
    domains = {}
    for name, layers in sums.items():
        first = layers[moe_layers[0]]
        domains[name] = LensDomain(tokens=int(round(float(first.tokens))),
                                   source=SourceDescription(**loaded[name].description()),
                                   layers={str(layer): s.result() for layer, s in layers.items()})
    identity = ModelIdentity(
        source=model, revision=revision, family=family.name, config_hash=config_hash(config, family.top_k_key), moe_layers=moe_layers,
        experts_per_layer={str(layer): family.num_experts(config, layer) for layer in moe_layers},
        top_k=family.top_k(config), expert_groups=family.expert_groups(config))
    settings = LensSettings(max_tokens=options.max_tokens, seq_len=forward.seq_len, batch_size=forward.batch_size,
                            dtype=str(dtype).removeprefix("torch."), device=device.type, layerwise=forward.layerwise,
                            world_size=dist.world)
    return LensReport(tool_version=__version__, model=identity, settings=settings, domains=domains)


def _run_whole(checkpoint, work, sums, options, device, dtype, dist) -> None:
    family, config = checkpoint.family, checkpoint.config
    model = family.model_class(config).from_pretrained(checkpoint.reader.path, dtype=dtype).to(device).eval()
    head = (model.get_submodule(family.final_norm_path), model.get_submodule(family.lm_head_path))
    current = {}
    detach = [_attach(family, config, layer, model.get_submodule(family.decoder_layer_path(layer)),
                      lambda: current["lens"]) for layer in family.moe_layers(config)]
    try:
        with torch.no_grad(), tqdm(total=sum(b.tokens for _, b in work), desc="lens", unit="tok", unit_scale=True,
                                   disable=not options.progress or dist.rank != 0, dynamic_ncols=True) as bar:
            for name, batch in work:
                current["lens"] = _BatchLens(sums[name], head, batch, device)
                mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
                logits = model(input_ids=batch.input_ids.to(device), attention_mask=mask, use_cache=False).logits
                current["lens"].finish(logits)
                bar.update(batch.tokens)
    finally:
        for undo in detach:
            undo()


def _run_layerwise(checkpoint, work, sums, options, device, dtype, dist) -> None:
    family, config = checkpoint.family, checkpoint.config
    runner = LayerwiseModel(family, config, CheckpointTensors(checkpoint.reader, checkpoint.layout), device, dtype)
    head_fn = runner.load_head()
    head = (runner.model.get_submodule(family.final_norm_path), runner.model.get_submodule(family.lm_head_path))
    lenses = [_BatchLens(sums[name], head, batch, device) for name, batch in work]
    moe_layers = set(family.moe_layers(config))
    current = {}

    def visit(step):
        if step.layer not in moe_layers:
            return
        undo = _attach(family, config, step.layer, step.modules[0], lambda: current["lens"])
        try:
            for i, lens in enumerate(lenses):
                current["lens"] = lens
                step.set_output(0, i, step.run(0, i))
        finally:
            undo()

    stores = run_layer_by_layer([runner], [batch for _, batch in work], visit=visit, desc="lens (layer by layer)",
                                progress=options.progress and dist.rank == 0)
    try:
        with torch.no_grad():
            for i, lens in enumerate(lenses):
                lens.finish(head_fn(stores[0].get(i, device)))
    finally:
        stores[0].close()
