"""Perplexity of a model on token sequences (padding excluded)."""

from __future__ import annotations

import math

import torch

from compressor.data.batching import batches


@torch.no_grad()
def perplexity(model, sequences: list[list[int]], batch_size: int = 8, device="cpu") -> float:
    """exp(mean next-token negative log-likelihood) over every predicted real token."""
    nll, count = 0.0, 0
    for batch in batches(sequences, batch_size):
        ids = batch.input_ids.to(device)
        mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        targets = ids[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        )
        keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
        nll += float(losses[keep.reshape(-1)].double().sum())
        count += int(keep.sum())
    return math.exp(nll / max(count, 1))
