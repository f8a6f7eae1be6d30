"""Lazy reading of local safetensors checkpoints (``model.safetensors`` or an index + shards).

Opening a checkpoint parses only the shard headers, so stages can plan from names, dtypes, shapes and
sizes alone; tensors are read one at a time on request.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from compressor.errors import UserError
from compressor.io.safetensors_format import ParsedHeader, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.bin", "*.pt", "*.pth", "*.ckpt")


class MissingTensorError(UserError, KeyError):
    """A tensor name that the checkpoint does not hold (also a KeyError)."""

    __str__ = Exception.__str__


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `data_offsets` are absolute byte offsets in `shard`, end exclusive."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: Path
    data_offsets: tuple[int, int]
    nbytes: int


class CheckpointReader:
    """A local checkpoint directory, opened lazily.

    Accepts ``model.safetensors.index.json`` + shards, ``model.safetensors``, or a single other
    ``*.safetensors`` file. Raises `UserError` (one line) for a missing directory or config.json,
    pickle-only weights, missing shards, corrupt or truncated shards, names the index promises but a
    shard lacks, and unsupported dtypes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"checkpoint directory {self.path} does not exist")
        if not self.path.is_dir():
            raise UserError(f"{self.path} is not a directory; pass the checkpoint directory that holds config.json")
        self._handles: dict[Path, object] = {}
        self._files: dict[Path, object] = {}
        weight_map = self._find_weights()
        self.config: dict = self._read_config()
        self._headers: dict[Path, ParsedHeader] = {}
        for shard in dict.fromkeys(weight_map.values()):
            self._headers[shard] = read_header(shard)
        self._infos: dict[str, TensorInfo] = {}
        for name, shard in weight_map.items():
            header = self._headers[shard]
            entry = header.entries.get(name)
            if entry is None:
                raise UserError(
                    f"{INDEX_NAME} in {self.path} lists {name!r} in {shard.name}, but that shard does not hold it"
                )
            begin, end = header.data_start + entry.begin, header.data_start + entry.end
            self._infos[name] = TensorInfo(name, entry.dtype, entry.shape, shard, (begin, end), end - begin)
        self._names = sorted(self._infos)

    # -- locating the files ---------------------------------------------------------------------

    def _find_weights(self) -> dict[str, Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            return self._read_index(index)
        single = self.path / SINGLE_NAME
        if not single.is_file():
            candidates = sorted(p for p in self.path.glob("*.safetensors") if p.is_file())
            if len(candidates) > 1:
                raise UserError(
                    f"{self.path} holds {len(candidates)} .safetensors files "
                    f"but no {INDEX_NAME} saying how they fit together"
                )
            if not candidates:
                pickles = sorted({p.name for pattern in _PICKLE_PATTERNS for p in self.path.glob(pattern)})
                if pickles:
                    raise UserError(
                        f"{self.path} holds only {', '.join(pickles[:3])}{' ...' if len(pickles) > 3 else ''}: "
                        "pickle-only weights are not supported (they can run code when loaded); convert to safetensors"
                    )
                raise UserError(f"no safetensors weights in {self.path} (expected {SINGLE_NAME} or {INDEX_NAME})")
            single = candidates[0]
        return {name: single for name in read_header(single).entries}

    def _read_index(self, index: Path) -> dict[str, Path]:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise UserError(
                f"{index} is not a valid safetensors index (needs a \"weight_map\" of name -> shard file)"
            ) from None
        shards: dict[str, Path] = {}
        for filename in dict.fromkeys(weight_map.values()):
            shard = self.path / filename
            if Path(filename).name != filename or not shard.is_file():
                raise UserError(f"{INDEX_NAME} lists shard {filename}, which is missing from {self.path}")
            shards[filename] = shard
        return {name: shards[filename] for name, filename in weight_map.items()}

    def _read_config(self) -> dict:
        path = self.path / CONFIG_NAME
        if not path.is_file():
            raise UserError(f"no {CONFIG_NAME} in checkpoint directory {self.path}")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot parse {path}: {exc}") from None
        if not isinstance(config, dict):
            raise UserError(f"{path} does not hold a JSON object")
        return config

    # -- metadata (headers only) ------------------------------------------------------------------

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self):
        return iter(self._names)

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape, shard and absolute byte range of tensor `name` (no data is read)."""
        try:
            return self._infos[name]
        except KeyError:
            raise MissingTensorError(f"tensor {name!r} is not in checkpoint {self.path}") from None

    def meta(self, name: str) -> torch.Tensor:
        """A tensor on the ``meta`` device with `name`'s dtype and shape."""
        info = self.info(name)
        return torch.empty(info.shape, dtype=info.dtype, device="meta")

    def shards(self) -> list[Path]:
        """The shard files, in the order the checkpoint lists them."""
        return list(self._headers)

    def tensors_in_shard(self, shard: str | os.PathLike) -> list[str]:
        """Names of the checkpoint's tensors stored in `shard` (a path or file name), in on-disk order."""
        wanted = Path(shard).name
        matches = [s for s in self._headers if s.name == wanted]
        if not matches:
            raise UserError(f"{wanted} is not a shard of checkpoint {self.path}")
        names = [info.name for info in self._infos.values() if info.shard == matches[0]]
        return sorted(names, key=lambda n: self._infos[n].data_offsets[0])

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data in the checkpoint (what an index calls ``total_size``)."""
        return sum(info.nbytes for info in self._infos.values())

    @property
    def total_parameters(self) -> int:
        """Elements of all tensors (the parameter count as stored; buffers such as rotary tables excluded)."""
        return sum(math.prod(info.shape) for info in self._infos.values())

    # -- data ------------------------------------------------------------------------------------

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read tensor `name` (one tensor; other tensors stay on disk)."""
        info = self.info(name)
        handle = self._handles.get(info.shard)
        if handle is None:
            handle = self._handles[info.shard] = safe_open(str(info.shard), framework="pt", device="cpu")
        tensor = handle.get_tensor(name)
        if torch.device(device) != torch.device("cpu"):
            tensor = tensor.to(device)
        return tensor

    def read_raw(self, name: str) -> bytes:
        """The exact on-disk bytes of tensor `name` (little-endian, row-major), for byte-identical copies."""
        fd, offset, nbytes = self.raw_location(name)
        chunks = []
        while nbytes:  # pread returns at most ~2 GiB at a time
            chunk = os.pread(fd, min(nbytes, 1 << 30), offset)
            if not chunk:
                raise UserError(f"corrupt safetensors shard for {name!r}: file was truncated while reading it")
            chunks.append(chunk)
            offset, nbytes = offset + len(chunk), nbytes - len(chunk)
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    def raw_location(self, name: str) -> tuple[int, int, int]:
        """(open file descriptor, byte offset, byte count) of tensor `name`'s data, for kernel-side copies."""
        info = self.info(name)
        handle = self._files.get(info.shard)
        if handle is None:
            handle = self._files[info.shard] = open(info.shard, "rb")
        begin, end = info.data_offsets
        if os.fstat(handle.fileno()).st_size < end:
            raise UserError(f"corrupt safetensors shard {info.shard}: file is truncated while reading {name!r}")
        return handle.fileno(), begin, end - begin

    def close(self) -> None:
        """Release open shard handles (the reader can still be used; handles reopen on demand)."""
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self._names)} tensors in {len(self._headers)} shards)"
