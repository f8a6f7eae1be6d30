"""Fitted compensation for pruned, narrower routing: `scale`, `refit` and `distill`, one MoE layer at a time.

The original and the pruned model run side by side, layer by layer, on calibration tokens (the one
layer-by-layer driver, `runtime.run_layer_by_layer`). For each MoE layer the pruned layer sees the hidden states
of the already-compensated pruned model below it, and is fitted so that its output matches the ORIGINAL model's
output of that layer (so errors from lower layers are corrected too):
- `scale`:   one least-squares scale per kept expert on its weighted output, folded into its down projection;
- `refit`:   ridge refit of each kept expert's down projection (per-expert Gram matrices of its intermediate
             activations, fp64), regularised towards the original weights;
- `distill`: a few hundred Adam steps on the kept experts and the shared experts (optionally the router)
             minimising the MoE block's output error; then, with `distill_e2e_steps`, end-to-end distillation of
             every MLP (dense layers' too) on the KL divergence between the original and the pruned model's
             next-token distributions (both models whole in memory: for models that fit).
Everything goes through the MoE-block interface (`families.moe_block`), so any supported family can be fitted.
Fitted tensors are kept in per-layer safetensors files under a scratch directory (bounded memory).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from compressor.data.batching import batches, token_sequences
from compressor.data.sources import load_source
from compressor.errors import UserError
from compressor.families.layout import CheckpointLayout
from compressor.families.moe_block import MoEBlock
from compressor.runtime import (
    CheckpointTensors, LayerwiseModel, load_tokenizer, resolve_device, resolve_dtype, run_layer_by_layer,
)


class FittedTensors:
    """Fitted tensors by output name, stored per layer on disk; `pop(name)` reads one back."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.files: dict[str, Path] = {}

    def add_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        """Store (or replace) fitted tensors of `layer`; each call writes a new file."""
        path = self.scratch / f"fitted-{len(set(self.files.values()))}-layer-{layer}.safetensors"
        save_file({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, str(path))
        self.files.update({name: path for name in tensors})

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self.files[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def pop(self, name: str) -> torch.Tensor:
        tensor = self[name]
        del self.files[name]
        return tensor


def _calibration_sequences(reader, fit, run, config):
    """Calibration token sequences of every domain (an equal share of `max_tokens` each) and the pad id."""
    tokenizer = None
    loaded = {name: load_source(spec, default_split="calibration") for name, spec in fit.calibration.items()}
    if any(not source.pretokenized for source in loaded.values()):
        tokenizer = load_tokenizer(Path(reader.path))
    sequences = []
    per_domain = max(1, fit.max_tokens // len(loaded))
    for name, source in loaded.items():
        domain_sequences = token_sequences(source, tokenizer, run.seq_len, per_domain)
        if not domain_sequences:
            raise UserError(f"calibration domain {name!r} has no tokens")
        sequences += domain_sequences
    vocab = int(config["vocab_size"])
    if max(max(s) for s in sequences if s) >= vocab:
        raise UserError(f"calibration data has token ids outside the model's vocabulary of {vocab}")
    pad = int(getattr(tokenizer, "pad_token_id", None) or 0) if tokenizer is not None else 0
    return sequences, pad


def _relative_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(((pred - target).double().pow(2).sum() / target.double().pow(2).sum().clamp_min(1e-30)))


def pruned_models(source, new_config: dict, mapping, output_names: list[str], device, dtype):
    """The original and the pruned model as LayerwiseModels over the source's tensors (the pruned one through the
    export's tensor mapping), and the pruned checkpoint's layout."""
    pruned_layout = CheckpointLayout(source.family, new_config, output_names)
    original = LayerwiseModel(source.family, source.config, CheckpointTensors(source.reader, source.layout),
                              device, dtype)
    pruned = LayerwiseModel(source.family, new_config,
                            CheckpointTensors(source.reader, pruned_layout, source.layout, mapping.layer_tensors),
                            device, dtype)
    return original, pruned, pruned_layout


def fit_compensation(source, new_config, mapping, output_names, mode, fit, run, scratch: Path):
    """Fit `mode` on the calibration sources (`fit`: FitOptions, `run`: RunOptions); returns (FittedTensors by
    output name, per-layer report)."""
    device, dtype = resolve_device(run.device), resolve_dtype(run.dtype)
    family = source.family
    sequences, pad = _calibration_sequences(source.reader, fit, run, source.config)
    work = list(batches(sequences, run.batch_size, pad))
    original, pruned, pruned_layout = pruned_models(source, new_config, mapping, output_names, device, dtype)
    fitted = FittedTensors(scratch)
    report = {"mode": mode, "calibration_tokens": sum(b.tokens for b in work), "layers": {}}
    moe_layers = set(family.moe_layers(source.config))
    started = time.perf_counter()

    def visit(step):
        targets = [step.run(0, b) for b in range(len(work))]
        if step.layer in moe_layers:
            tensors, layer_report = _fit_layer(pruned, pruned_layout, step, targets, mode, fit.distill)
            fitted.add_layer(step.layer, tensors)
            report["layers"][str(step.layer)] = layer_report
        for b, target in enumerate(targets):
            step.set_output(0, b, target)

    stores = run_layer_by_layer([original, pruned], work, visit=visit, desc=f"compensation ({mode})",
                                progress=run.progress)
    for store in stores:
        store.close()
    if mode == "distill" and fit.distill.e2e_steps:
        report["end_to_end"] = _distill_end_to_end(source, new_config, mapping, output_names, fitted, sequences,
                                                   pad, fit.distill, run, device, dtype)
    report["seconds"] = time.perf_counter() - started
    return fitted, report


def _moe_problem(pruned, step, targets):
    """Per valid token: the pruned MoE block's input, and the block output that would make the pruned layer's
    output equal the original layer's (the target minus the residual around the block)."""
    module = step.modules[1]
    block_module = getattr(module, pruned.family.block_attr)
    captured = {}

    def capture(_module, inputs, output):
        captured["input"] = inputs[0]
        captured["output"] = output[0] if pruned.family.block_returns_tuple else output

    inputs, wanted = [], []
    handle = block_module.register_forward_hook(capture)
    try:
        for b, batch in enumerate(step.batches):
            layer_output = step.run(1, b)
            residual = layer_output - captured["output"]  # what the layer adds besides the MoE block
            valid = batch.valid().to(layer_output.device)
            hidden = layer_output.shape[-1]
            inputs.append(captured["input"].reshape(-1, hidden)[valid].float())
            wanted.append((targets[b] - residual).reshape(-1, hidden)[valid].float())
    finally:
        handle.remove()
    return torch.cat(inputs), torch.cat(wanted)


def _block_output(block: MoEBlock, x: torch.Tensor):
    """(routed output, shared output or 0, routing, unweighted expert outputs) of the block on tokens `x`, fp32."""
    dtype = block.router.weight.dtype
    routing = block.route(x.to(dtype))
    outputs = block.expert_outputs(x.to(dtype), routing.indices).float()
    routed = (outputs * routing.weights.unsqueeze(-1)).sum(1)
    shared = block.shared_output(x.to(dtype))
    return routed, 0 if shared is None else shared.float(), routing, outputs


def _fit_layer(pruned, pruned_layout, step, targets, mode, distill):
    x, wanted = _moe_problem(pruned, step, targets)
    block = MoEBlock(pruned.family, pruned.config, step.layer, step.modules[1])
    with torch.no_grad():
        routed, shared, routing, outputs = _block_output(block, x)
    before = _relative_error(routed + shared, wanted)
    if mode == "scale":
        _fit_scale(block, routing, outputs, wanted - shared)
    elif mode == "refit":
        _fit_refit(block, x, routing, outputs, wanted - shared)
    elif mode == "distill":
        _fit_distill(block, x, wanted, distill)
    else:
        raise ValueError(mode)
    with torch.no_grad():
        routed, shared, *_ = _block_output(block, x)
    after = _relative_error(routed + shared, wanted)
    trained = block.routed_parameters()
    if mode == "distill":
        trained += block.shared_parameters() + (block.router_parameters() if distill.router else [])
    tensors = _disk_tensors(pruned, pruned_layout, step.layer, step.modules[1], trained)
    return tensors, {"relative_error_before": before, "relative_error_after": after, "tokens": int(x.shape[0])}


def _disk_tensors(runner, layout, layer: int, module: torch.nn.Module, parameters) -> dict[str, torch.Tensor]:
    """The on-disk tensors (output names and layout) of `parameters` of decoder layer `layer`'s `module`."""
    wanted = {id(p) for p in parameters}
    prefix = runner.family.decoder_layer_path(layer) + "."
    state = {prefix + name: p.detach() for name, p in module.named_parameters() if id(p) in wanted}
    return layout.to_disk(state, runner.model)


def _fit_scale(block: MoEBlock, routing, outputs, target):
    """Least-squares scales c_e minimising || sum_s c_{e_s} w_s E_s(x) - target ||^2 (fp64 normal equations),
    folded into each expert's down projection (and its bias)."""
    n, idx, weight = block.num_experts, routing.indices, routing.weights
    weighted = (outputs * weight.unsqueeze(-1)).double()  # [T, K, H]
    gram = torch.zeros(n, n, dtype=torch.float64, device=idx.device)
    rhs = torch.zeros(n, dtype=torch.float64, device=idx.device)
    pair = torch.einsum("tkh,tjh->tkj", weighted, weighted)
    k = idx.shape[1]
    rows = idx.unsqueeze(2).expand(-1, k, k).reshape(-1)
    cols = idx.unsqueeze(1).expand(-1, k, k).reshape(-1)
    gram.index_put_((rows, cols), pair.reshape(-1), accumulate=True)
    rhs.index_add_(0, idx.reshape(-1), torch.einsum("tkh,th->tk", weighted, target.double()).reshape(-1))
    ridge = 1e-4 * gram.diagonal().clamp_min(0) + 1e-12
    scales = torch.linalg.solve(gram + torch.diag(ridge), rhs + ridge)  # pulled towards 1 where data is thin
    with torch.no_grad():
        for expert in range(n):
            views = block.expert_weights(expert)
            for view in (views.down, views.down_bias):
                if view is not None:
                    view.mul_(scales[expert].to(view.dtype))


def _fit_refit(block: MoEBlock, x, routing, outputs, target):
    """Ridge refit of each kept expert's down projection to its share of the target (other slots' outputs removed)."""
    idx, weight = routing.indices, routing.weights
    weighted = outputs * weight.unsqueeze(-1)
    others = weighted.sum(1, keepdim=True) - weighted  # [T, K, H]: the other slots' contribution
    slot_target = target.unsqueeze(1) - others
    for expert in range(block.num_experts):
        tokens, slots = torch.nonzero(idx == expert, as_tuple=True)
        if tokens.numel() == 0:
            continue
        views = block.expert_weights(expert)
        with torch.no_grad():
            act = block.expert_activation(expert, x[tokens].to(views.down.dtype)).double()
            act = act * weight[tokens, slots, None].double()
            goal = slot_target[tokens, slots].double()
            if views.down_bias is not None:  # the bias stays; fit the rest
                goal = goal - weight[tokens, slots, None].double() * views.down_bias.double()
            old = views.down.double()  # [H, I]
            gram = act.T @ act  # [I, I]
            cross = act.T @ goal  # [I, H]
            ridge = 1e-2 * gram.diagonal().mean().clamp_min(1e-12)
            eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
            solution = torch.linalg.solve(gram + ridge * eye, cross + ridge * old.T)  # [I, H]
            views.down.copy_(solution.T.to(views.down.dtype))


def _fit_distill(block: MoEBlock, x, wanted, distill):
    """Adam on the kept experts and shared experts (and the router with `distill.router`)."""
    parameters = block.routed_parameters() + block.shared_parameters()
    if distill.router:
        parameters += block.router_parameters()
    originals = [p.dtype for p in parameters]
    for p in parameters:
        p.data = p.data.float()
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=distill.lr)
    generator = torch.Generator(device=x.device).manual_seed(0)
    scale = wanted.pow(2).mean().clamp_min(1e-30)
    batch = min(distill.batch_tokens, x.shape[0])
    steps = distill.steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(steps):
        pick = torch.randint(0, x.shape[0], (batch,), generator=generator, device=x.device)
        routed, shared, *_ = _block_output(block, x[pick])
        loss = (routed + shared - wanted[pick]).pow(2).mean() / scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    for p, dtype in zip(parameters, originals):
        p.requires_grad_(False)
        p.data = p.data.to(dtype)


def check_end_to_end_memory(original_parameters: int, pruned_parameters: int, device, dtype) -> None:
    """Refuse end-to-end distillation up front when both models whole (the original in `dtype`, the pruned one
    in fp32 with gradients and Adam state) do not fit the device's free memory (1 GiB kept for activations)."""
    import psutil

    element = torch.empty((), dtype=dtype).element_size()
    needed = original_parameters * element + 4 * 4 * pruned_parameters + 2**30
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    if needed > free:
        raise UserError(f"end-to-end distillation holds the original and the pruned model whole: it needs about "
                        f"{needed / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is free on {device}; set "
                        f"distill_e2e_steps to 0 (layer-wise distillation only) or use a device with more memory")


class _WholeModel:
    """Every decoder layer of a LayerwiseModel materialised, run as embedding -> layers -> norm + LM head."""

    def __init__(self, runner: LayerwiseModel):
        self.runner = runner
        self.layers = [runner.load_layer(layer) for layer in range(runner.num_layers)]
        self.head = runner.load_head()
        for parameter in runner.model.parameters():
            parameter.requires_grad_(False)

    def logits(self, input_ids: torch.Tensor, attention_mask) -> torch.Tensor:
        hidden = self.runner.embed(input_ids)
        for module in self.layers:
            hidden = self.runner.run_layer(module, hidden, attention_mask)
        return self.head(hidden).float()


def _distill_end_to_end(source, new_config, mapping, output_names, fitted, sequences, pad, distill, run, device,
                        dtype):
    """Train the layer-wise distilled MoE tensors further on KL(original || pruned) of next-token distributions.

    Trains every decoder layer's MLP: kept and shared experts, the router with distill_router, and the MLPs of
    dense layers (measured: math +4.7% -> +4.2% on the reference model); attention, norms and embeddings stay
    as they are. Updates `fitted` in place.
    """
    started = time.perf_counter()
    family = source.family
    original, pruned, pruned_layout = pruned_models(source, new_config, mapping, output_names, device, dtype)
    teacher = _WholeModel(original)

    def fitted_layer(layer, tensors):
        tensors = mapping.layer_tensors(layer, tensors)
        return {name: fitted[name] if name in fitted else tensor for name, tensor in tensors.items()}

    pruned.tensors.map_layer = fitted_layer
    pruned.dtype = torch.float32
    student = _WholeModel(pruned)
    trained = {}
    moe_layers = set(family.moe_layers(new_config))
    for layer, module in enumerate(student.layers):
        mlp = getattr(module, family.block_attr)
        frozen = set()
        if layer in moe_layers and not distill.router:
            frozen = {id(p) for p in MoEBlock(family, new_config, layer, module).router_parameters()}
        for parameter in mlp.parameters():
            if id(parameter) not in frozen:
                parameter.requires_grad_(True)
                trained.setdefault(layer, []).append(parameter)
    steps = distill.e2e_steps
    warmup = max(1, steps // 10)
    optimizer = torch.optim.Adam([p for ps in trained.values() for p in ps], lr=distill.e2e_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    rows = max(1, distill.batch_tokens // run.seq_len)
    generator = torch.Generator().manual_seed(0)
    losses = []
    bar = tqdm(total=steps, desc="compensation (end-to-end)", unit="step", disable=not run.progress,
               dynamic_ncols=True)
    for _ in range(steps):
        pick = torch.randint(0, len(sequences), (rows,), generator=generator).tolist()
        batch = next(batches([sequences[i] for i in pick], rows, pad))
        mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
        with torch.no_grad():
            target = teacher.logits(batch.input_ids, mask).log_softmax(-1)
        predicted = student.logits(batch.input_ids, mask).log_softmax(-1)
        per_token = (target.exp() * (target - predicted)).sum(-1).reshape(-1)[batch.valid().to(device)]
        loss = per_token.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
    bar.close()
    for layer, parameters in trained.items():
        for p in parameters:
            p.data = p.data.to(dtype)
        fitted.add_layer(layer, _disk_tensors(pruned, pruned_layout, layer, student.layers[layer], parameters))
    tail = max(1, steps // 10)
    return {"steps": steps, "lr": distill.e2e_lr, "sequences_per_step": rows,
            "kl_first": sum(losses[:tail]) / tail, "kl_last": sum(losses[-tail:]) / tail,
            "seconds": time.perf_counter() - started}
