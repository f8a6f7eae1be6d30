"""Turn a loaded source into token sequences and padded batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from compressor.data.sources import LoadedSource
from compressor.errors import UserError


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, seq] right-padded
    attention_mask: torch.Tensor | None  # [batch, seq] 1 = real token; None when nothing is padded

    @property
    def tokens(self) -> int:
        return self.input_ids.numel() if self.attention_mask is None else int(self.attention_mask.sum())

    def valid(self) -> torch.Tensor:
        """Flat bool mask of real tokens, row-major."""
        if self.attention_mask is None:
            return torch.ones(self.input_ids.numel(), dtype=torch.bool, device=self.input_ids.device)
        return self.attention_mask.reshape(-1).bool()


def token_sequences(source: LoadedSource, tokenizer, seq_len: int, max_tokens: int | None) -> list[list[int]]:
    """Sequences of at most `seq_len` tokens, `max_tokens` in all.

    Text is tokenized with the model's tokenizer (its special tokens, e.g. BOS, included), concatenated and
    packed into `seq_len` chunks. Pre-tokenized rows are used as given, one sequence each (cut at `seq_len`).
    """
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    budget = max_tokens if max_tokens is not None else float("inf")
    sequences: list[list[int]] = []
    used = 0
    if source.pretokenized:
        for row in source.token_ids:
            if used >= budget:
                break
            row = row[: min(seq_len, int(budget - used))] if budget != float("inf") else row[:seq_len]
            sequences.append(list(row))
            used += len(row)
        return sequences
    if tokenizer is None:
        raise UserError(f"data source {source.spec!r} is text, but the model has no tokenizer files")
    stream: list[int] = []
    for text in source.texts:
        stream.extend(tokenizer(text)["input_ids"])
        if len(stream) >= budget:
            break
    if budget != float("inf"):
        stream = stream[: int(budget)]
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]


def batches(sequences: list[list[int]], batch_size: int, pad_id: int = 0) -> Iterator[Batch]:
    """Right-padded batches in order; the attention mask is None when no row is padded."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    for start in range(0, len(sequences), batch_size):
        rows = sequences[start : start + batch_size]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        yield Batch(ids, None if bool(mask.all()) else mask)
