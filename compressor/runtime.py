"""What every stage shares to run a model: device and dtype choice, the tokenizer, torch.distributed ranks."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from compressor.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`; UserError otherwise or when CUDA is missing."""
    if not isinstance(device, str):
        raise UserError(f"--device must be cpu, cuda or auto, not {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA device is available")
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise UserError(f"--device must be cpu, cuda, cuda:N or auto, not {device!r}")
    if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    """float32 / bfloat16 / float16 (or fp32 / bf16 / fp16); UserError otherwise."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]


def load_tokenizer(model_dir: Path):
    """The model's tokenizer, or None when the checkpoint has no tokenizer files."""
    if not any((model_dir / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


class Distributed:
    """Rank/world of a torch.distributed run (torchrun / accelerate launch), or a single process."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1 and device.type == "cuda" and device.index is None:
            # one GPU per rank (torchrun sets LOCAL_RANK), not every rank on the current device
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if self.world > 1 and not torch.distributed.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            # the backend must match where the accumulators live (--device cpu on a GPU machine: gloo)
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)

    def mine(self, index: int) -> bool:
        return index % self.world == self.rank

    def all_reduce(self, tensors: list[torch.Tensor]) -> None:
        if self.world > 1:
            for tensor in tensors:
                torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
