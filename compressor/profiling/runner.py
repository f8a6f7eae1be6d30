"""Run calibration data through a model and collect per-domain routing statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from compressor import __version__
from compressor.data.batching import Batch, batches
from compressor.data.sources import LoadedSource, load_source
from compressor.errors import UserError
from compressor.families import open_checkpoint
from compressor.io.resolve import resolve_model
from compressor.profiling.collector import RoutingCollector
from compressor.profiling.schema import DomainProfile, ModelIdentity, Profile, ProfileSettings, SourceDescription, config_hash
from compressor.runtime import (
    CheckpointTensors, Distributed, ForwardOptions, LayerwiseModel, resolve_device, resolve_dtype, run_layer_by_layer,
    tokenize_domains,
)


@dataclass
class ProfileOptions:
    max_tokens: int | None = 65536
    forward: ForwardOptions = field(default_factory=ForwardOptions)
    revision: str | None = None
    activation_budget_bytes: int = 2 * 2**30
    progress: bool = True


def profile_model(model: str, sources: dict[str, str], options: ProfileOptions | None = None) -> Profile:
    """Profile `model` (local dir or Hub id) on named SOURCEs; returns the Profile (not written)."""
    options = options or ProfileOptions()
    forward = options.forward
    device, dtype = resolve_device(forward.device), resolve_dtype(forward.dtype)
    loaded = {name: load_source(spec, default_split="calibration", text_field=forward.text_field)
              for name, spec in sources.items()}
    model_dir, revision = resolve_model(model, options.revision)
    checkpoint = open_checkpoint(model_dir)
    config, family = checkpoint.config, checkpoint.family
    domain_sequences, pad_id = tokenize_domains(model_dir, config, loaded, forward.seq_len, options.max_tokens)
    dist = Distributed(device)
    device = dist.device
    run = _run_layerwise if forward.layerwise else _run_whole_model
    try:
        domains = run(checkpoint, domain_sequences, loaded, options, device, dtype, dist, pad_id)
    finally:
        dist.close()
    checkpoint.close()
    identity = ModelIdentity(
        source=model,
        revision=revision,
        family=family.name,
        config_hash=config_hash(config, family.top_k_key),
        moe_layers=family.moe_layers(config),
        experts_per_layer={str(layer): family.num_experts(config, layer) for layer in family.moe_layers(config)},
        top_k=family.top_k(config),
        expert_groups=family.expert_groups(config),
    )
    settings = ProfileSettings(
        max_tokens=options.max_tokens, seq_len=forward.seq_len, batch_size=forward.batch_size,
        dtype=str(dtype).removeprefix("torch."), device=device.type, layerwise=forward.layerwise,
        world_size=dist.world,
    )
    return Profile(tool_version=__version__, model=identity, settings=settings, domains=domains)


def _domain_profile(name: str, collector: RoutingCollector, tokens: int, sequences: int,
                    source: LoadedSource) -> DomainProfile:
    for layer, accumulator in collector.layers.items():
        if not all(bool(torch.isfinite(t).all()) for t in accumulator.tensors()):
            raise UserError(f"domain {name!r}, MoE layer {layer}: the routing statistics are not finite numbers "
                            "(NaN or infinite weights or activations?); no profile was written")
    return DomainProfile(
        tokens=tokens, sequences=sequences, source=SourceDescription(**source.description()),
        layers=collector.statistics(),
    )


def _progress(name, total, options, dist):
    return tqdm(total=total, desc=f"profile {name}", unit="tok", unit_scale=True,
                disable=not options.progress or dist.rank != 0, dynamic_ncols=True)


def _reduce_domain(collector, tokens, dist):
    # on the accumulators' device: NCCL reduces CUDA tensors only
    counter = torch.tensor([float(tokens)], dtype=torch.float64, device=dist.device)
    dist.all_reduce([t for acc in collector.layers.values() for t in acc.tensors()] + [counter])
    return int(round(float(counter)))


def _run_whole_model(checkpoint, domain_sequences, loaded, options, device, dtype, dist, pad_id):
    family, config, model_dir = checkpoint.family, checkpoint.config, checkpoint.reader.path
    model_class = family.model_class(config)
    model = model_class.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    domains = {}
    for name, sequences in domain_sequences.items():
        collector = RoutingCollector(family, config, device)
        collector.attach(model)
        tokens = 0
        total = sum(len(s) for s in sequences)
        with _progress(name, total, options, dist) as bar, torch.no_grad():
            for index, batch in enumerate(batches(sequences, options.forward.batch_size, pad_id)):
                if not dist.mine(index):
                    bar.update(batch.tokens)
                    continue
                batch = Batch(batch.input_ids.to(device),
                              None if batch.attention_mask is None else batch.attention_mask.to(device))
                collector.valid = batch.valid()
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                tokens += batch.tokens
                bar.update(batch.tokens)
        collector.detach()
        tokens = _reduce_domain(collector, tokens, dist)
        domains[name] = _domain_profile(name, collector, tokens, len(sequences), loaded[name])
    return domains


def _run_layerwise(checkpoint, domain_sequences, loaded, options, device, dtype, dist, pad_id):
    """One decoder layer in memory at a time; every batch of every domain passes through it before the next."""
    family, config = checkpoint.family, checkpoint.config
    runner = LayerwiseModel(family, config, CheckpointTensors(checkpoint.reader, checkpoint.layout), device, dtype)
    work = []  # (domain, Batch) for the batches this rank runs
    for name, sequences in domain_sequences.items():
        for index, batch in enumerate(batches(sequences, options.forward.batch_size, pad_id)):
            if dist.mine(index):
                work.append((name, batch))
    collectors = {name: RoutingCollector(family, config, device) for name in domain_sequences}
    moe_layers = set(family.moe_layers(config))

    def visit(step):
        if step.layer not in moe_layers:
            return
        attached = None
        for i, (name, batch) in enumerate(work):
            if attached is None or attached[0] != name:
                if attached is not None:
                    attached[1]()
                attached = (name, collectors[name].attach_layer(step.layer, step.modules[0]))
            collectors[name].valid = batch.valid().to(device)
            step.set_output(0, i, step.run(0, i))
        if attached is not None:
            attached[1]()

    stores = run_layer_by_layer([runner], [batch for _, batch in work], visit=visit, desc="profile (layer by layer)",
                                progress=options.progress and dist.rank == 0,
                                budget_bytes=options.activation_budget_bytes)
    for store in stores:
        store.close()
    domains = {}
    for name, sequences in domain_sequences.items():
        tokens = sum(batch.tokens for domain, batch in work if domain == name)
        tokens = _reduce_domain(collectors[name], tokens, dist)
        domains[name] = _domain_profile(name, collectors[name], tokens, len(sequences), loaded[name])
    return domains
