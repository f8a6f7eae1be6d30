"""Streaming safetensors writing: plan shards, write each header first, then tensor bytes in order.

Each shard goes to a temporary file beside its destination and is renamed into place (`os.replace`)
only once every planned tensor has been written with the planned size, so a crash never leaves a
half-written ``model-*.safetensors`` under its final name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from compressor.io.checkpoint import INDEX_NAME, SINGLE_NAME
from compressor.io.safetensors_format import encode_header, tensor_nbytes


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor as planned: name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class PlannedShard:
    """One output shard: its file name, the names it holds (in order) and their total bytes."""

    filename: str
    names: tuple[str, ...]
    nbytes: int


def shard_filename(index: int, count: int) -> str:
    """HF's shard naming: ``model-00001-of-00003.safetensors`` (``model.safetensors`` when count is 1)."""
    if count == 1:
        return SINGLE_NAME
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def plan_shards(entries: Iterable, max_shard_bytes: int) -> list[PlannedShard]:
    """Group tensors into shards in the given order, each at most `max_shard_bytes`.

    `entries` are ``(name, nbytes)`` pairs or objects with ``.name`` and ``.nbytes`` (e.g. `TensorSpec`).
    A new shard starts when the next tensor would overflow the current one; a tensor larger than
    the limit gets a shard of its own (as transformers does).
    """
    if max_shard_bytes <= 0:
        raise ValueError("max_shard_bytes must be positive")
    groups: list[tuple[list[str], int]] = []
    names: list[str] = []
    size = 0
    seen: set[str] = set()
    for entry in entries:
        name, nbytes = (entry.name, entry.nbytes) if hasattr(entry, "nbytes") else entry
        if name in seen:
            raise ValueError(f"tensor name {name!r} planned twice")
        seen.add(name)
        if names and size + nbytes > max_shard_bytes:
            groups.append((names, size))
            names, size = [], 0
        names.append(name)
        size += int(nbytes)
    if names or not groups:
        groups.append((names, size))
    return [
        PlannedShard(shard_filename(i, len(groups)), tuple(group), nbytes) for i, (group, nbytes) in enumerate(groups)
    ]


def write_index(directory: str | os.PathLike, weight_map: dict[str, str], total_size: int) -> Path:
    """Write ``model.safetensors.index.json`` (HF format) into `directory`, atomically; return its path."""
    path = Path(directory) / INDEX_NAME
    data = {"metadata": {"total_size": int(total_size)}, "weight_map": dict(sorted(weight_map.items()))}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class ShardWriter:
    """Write one safetensors file: header at open, then each planned tensor in order via `write`."""

    def __init__(self, path: str | os.PathLike, specs: Sequence[TensorSpec], metadata: dict | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        self._next = 0
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._file = open(self._tmp, "wb")
        try:
            header = encode_header(((s.name, s.dtype, s.shape) for s in self.specs), metadata)
            self._file.write(header)
        except BaseException:
            self.abort()
            raise
        self._expected_size = len(header) + sum(s.nbytes for s in self.specs)

    @property
    def done(self) -> bool:
        return self._next == len(self.specs)

    @property
    def next_name(self) -> str | None:
        return None if self.done else self.specs[self._next].name

    def write(self, name: str, data: torch.Tensor | bytes | bytearray | memoryview) -> None:
        """Write the next planned tensor: a tensor of the planned dtype/shape, or its exact raw bytes."""
        if self._file is None:
            raise RuntimeError(f"{self.path.name} is already closed")
        if self.done:
            raise ValueError(f"{self.path.name}: {name!r} is not planned (every planned tensor is already written)")
        spec = self.specs[self._next]
        if name != spec.name:
            raise ValueError(f"{self.path.name}: expected {spec.name!r} next, got {name!r}")
        if isinstance(data, torch.Tensor):
            if data.dtype != spec.dtype or tuple(data.shape) != spec.shape:
                raise ValueError(
                    f"{name!r}: planned {spec.dtype} {list(spec.shape)}, got {data.dtype} {list(data.shape)}"
                )
            payload = _tensor_bytes(data)
        else:
            payload = memoryview(data).cast("B")
        if payload.nbytes != spec.nbytes:
            raise ValueError(f"{name!r}: planned {spec.nbytes} bytes, got {payload.nbytes}")
        self._file.write(payload)
        self._next += 1

    def write_range(self, name: str, source_fd: int, offset: int, nbytes: int) -> None:
        """Write the next planned tensor as a copy of `nbytes` bytes of `source_fd` from `offset`, in the kernel
        (copy_file_range, as cp does) where the platform allows, else through bounded chunks."""
        if self._file is None:
            raise RuntimeError(f"{self.path.name} is already closed")
        spec = self.specs[self._next] if not self.done else None
        if spec is None or name != spec.name:
            raise ValueError(f"{self.path.name}: expected {spec.name if spec else 'nothing'!r} next, got {name!r}")
        if nbytes != spec.nbytes:
            raise ValueError(f"{name!r}: planned {spec.nbytes} bytes, got {nbytes}")
        self._file.flush()
        target = self._file.fileno()
        done = 0
        while done < nbytes:
            count = nbytes - done
            try:
                copied = os.copy_file_range(source_fd, target, count, offset + done)
            except (AttributeError, OSError):  # not Linux, or a file system without it: copy through memory
                copied = os.write(target, os.pread(source_fd, min(count, 16 << 20), offset + done))
            if copied == 0:
                raise ValueError(f"{name!r}: the source ended {nbytes - done} bytes early")
            done += copied
        self._next += 1

    def close(self, sync: bool = True) -> Path:
        """Check that everything planned was written, then move the file into place (fsync'ed first unless
        `sync` is False: the caller then syncs it, see `ShardedWriter.close`)."""
        if self._file is None:
            return self.path
        if not self.done:
            missing = len(self.specs) - self._next
            self.abort()
            raise ValueError(f"{self.path.name}: {missing} planned tensors were never written")
        self._file.flush()
        if sync:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        size = self._tmp.stat().st_size
        if size != self._expected_size:
            self._tmp.unlink(missing_ok=True)
            raise OSError(f"{self.path.name}: wrote {size} bytes, expected {self._expected_size}")
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file; the destination is left untouched."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ShardedWriter:
    """Write a whole checkpoint's weights as planned shards, streaming tensors in plan order.

    `shards` is a sequence of ``(filename, [TensorSpec | (name, dtype, shape), ...])``. Call
    `write(name, tensor_or_bytes)` for every planned tensor in order; each shard is opened (header
    written) when its first tensor arrives and moved into place when its last one is written.
    `close()` fsyncs every shard (all at the end, so that write-back overlaps the reads of later shards), writes
    ``model.safetensors.index.json`` when there is more than one shard (or when `index=True`) and returns the
    weight map.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        shards: Sequence[tuple[str, Sequence]],
        *,
        metadata: dict | None = None,
        index: bool | None = None,
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.metadata = metadata
        self.plan: list[tuple[str, list[TensorSpec]]] = []
        self.weight_map: dict[str, str] = {}
        for filename, specs in shards:
            specs = [s if isinstance(s, TensorSpec) else TensorSpec(*s) for s in specs]
            for spec in specs:
                if spec.name in self.weight_map:
                    raise ValueError(f"tensor name {spec.name!r} planned twice")
                self.weight_map[spec.name] = filename
            self.plan.append((filename, specs))
        self.total_size = sum(s.nbytes for _, specs in self.plan for s in specs)
        self._write_index = len(self.plan) > 1 if index is None else index
        self._shard = -1
        self._current: ShardWriter | None = None
        self.written: list[Path] = []

    @classmethod
    def planned(
        cls,
        directory: str | os.PathLike,
        specs: Iterable,
        max_shard_bytes: int,
        **kwargs,
    ) -> ShardedWriter:
        """A writer for `specs` (`TensorSpec` or ``(name, dtype, shape)``, in order) split by `plan_shards`."""
        specs = [s if isinstance(s, TensorSpec) else TensorSpec(*s) for s in specs]
        by_name = {s.name: s for s in specs}
        plan = plan_shards(specs, max_shard_bytes)
        return cls(directory, [(shard.filename, [by_name[n] for n in shard.names]) for shard in plan], **kwargs)

    def _advance(self) -> None:
        while self._current is None or self._current.done:
            if self._current is not None:  # synced all together in `close`: waiting here would stall the reads
                self.written.append(self._current.close(sync=False))
                self._current = None
            self._shard += 1
            if self._shard >= len(self.plan):
                return
            filename, specs = self.plan[self._shard]
            self._current = ShardWriter(self.directory / filename, specs, self.metadata)

    def write(self, name: str, data: torch.Tensor | bytes | bytearray | memoryview) -> None:
        """Write the next planned tensor (tensor of the planned dtype/shape, or its raw bytes)."""
        if self._current is None or self._current.done:
            self._advance()
        if self._current is None:
            raise ValueError(f"{name!r} is not planned (every planned tensor is already written)")
        self._current.write(name, data)
        if self._current.done:
            self._advance()

    def write_range(self, name: str, source_fd: int, offset: int, nbytes: int) -> None:
        """Write the next planned tensor as a kernel-side copy of a byte range of another file."""
        if self._current is None or self._current.done:
            self._advance()
        if self._current is None:
            raise ValueError(f"{name!r} is not planned (every planned tensor is already written)")
        self._current.write_range(name, source_fd, offset, nbytes)
        if self._current.done:
            self._advance()

    def close(self) -> dict[str, str]:
        """Finish: every planned tensor must have been written. Returns the weight map."""
        if self._current is None and self._shard < 0:
            self._advance()  # shards with no tensors at all
        if self._current is not None:
            shard = self._current
            self._current = None
            shard.abort()
            raise ValueError(f"{shard.path.name}: planned tensors were never written, starting at {shard.next_name!r}")
        for path in self.written:
            _fsync(path)
        if self._write_index:
            write_index(self.directory, self.weight_map, self.total_size)
        return dict(self.weight_map)

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
