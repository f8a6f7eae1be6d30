"""The safetensors file format, read and written without loading tensors.

A safetensors file is: 8 bytes (little-endian u64) header length N, then N bytes of JSON header
(padded with spaces to a multiple of 8), then the data region. The header maps each tensor name to
``{"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}`` (offsets relative to the data
region) and may hold ``"__metadata__"``: a string-to-string dict.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from compressor.errors import UserError

HEADER_LENGTH_BYTES = 8
ALIGNMENT = 8
# The safetensors library refuses headers above 100 MB; so do we (a larger length means a corrupt file).
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"

_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}


def torch_dtype(name: str, *, where: str = "") -> torch.dtype:
    """The torch dtype of a safetensors dtype string (``"BF16"`` -> ``torch.bfloat16``)."""
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        place = f" ({where})" if where else ""
        raise UserError(
            f"unsupported tensor dtype {name!r}{place}; supported: {', '.join(sorted(_DTYPES))}"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors dtype string of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise UserError(f"unsupported tensor dtype {dtype} for safetensors") from None


def tensor_nbytes(dtype: torch.dtype, shape) -> int:
    """Bytes taken by a dense tensor of this dtype and shape."""
    return math.prod(int(d) for d in shape) * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as a safetensors header describes it; offsets are relative to the data region."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class ParsedHeader:
    """A shard's header: where its data region starts, how long the file is, and its tensors."""

    path: Path
    data_start: int
    file_size: int
    metadata: dict
    entries: dict[str, HeaderEntry]


def read_header(path: Path) -> ParsedHeader:
    """Parse and check the header of safetensors file `path`; raise UserError on any corruption."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(HEADER_LENGTH_BYTES)
            if len(prefix) < HEADER_LENGTH_BYTES:
                raise UserError(f"corrupt safetensors shard {path}: file is truncated ({file_size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise UserError(f"corrupt safetensors shard {path}: header length {header_len} is implausible")
            if HEADER_LENGTH_BYTES + header_len > file_size:
                raise UserError(
                    f"corrupt safetensors shard {path}: file is truncated "
                    f"(header says {header_len} bytes of JSON, file has {file_size} bytes)"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise UserError(f"cannot read safetensors shard {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"corrupt safetensors shard {path}: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise UserError(f"corrupt safetensors shard {path}: header is not a JSON object")
    data_start = HEADER_LENGTH_BYTES + header_len
    data_size = file_size - data_start
    metadata = header.pop(METADATA_KEY, None) or {}
    entries: dict[str, HeaderEntry] = {}
    for name, spec in header.items():
        entries[name] = _parse_entry(path, name, spec, data_size)
    return ParsedHeader(path=path, data_start=data_start, file_size=file_size, metadata=metadata, entries=entries)


def _parse_entry(path: Path, name: str, spec, data_size: int) -> HeaderEntry:
    try:
        dtype_str = spec["dtype"]
        shape = tuple(int(d) for d in spec["shape"])
        begin, end = (int(x) for x in spec["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"corrupt safetensors shard {path}: malformed header entry for {name!r}") from None
    dtype = torch_dtype(dtype_str, where=f"tensor {name!r} in {path}")
    if any(d < 0 for d in shape) or not 0 <= begin <= end:
        raise UserError(f"corrupt safetensors shard {path}: invalid shape or offsets for {name!r}")
    if end - begin != tensor_nbytes(dtype, shape):
        raise UserError(
            f"corrupt safetensors shard {path}: {name!r} has {end - begin} bytes, "
            f"but {dtype_str} {list(shape)} needs {tensor_nbytes(dtype, shape)}"
        )
    if end > data_size:
        raise UserError(
            f"corrupt safetensors shard {path}: file is truncated "
            f"({name!r} ends at data byte {end}, the file holds {data_size} data bytes)"
        )
    return HeaderEntry(name=name, dtype=dtype, shape=shape, begin=begin, end=end)


def encode_header(entries, metadata: dict | None = None) -> bytes:
    """Length prefix + JSON header for `entries` (``(name, dtype, shape)`` in data order), space-padded to 8 bytes.

    Tensors are laid out back to back in the given order. Returns the bytes to write before the data.
    """
    header: dict = {METADATA_KEY: {str(k): str(v) for k, v in (metadata or {"format": "pt"}).items()}}
    offset = 0
    for name, dtype, shape in entries:
        if name in header:
            raise ValueError(f"tensor name {name!r} appears twice in one shard")
        nbytes = tensor_nbytes(dtype, shape)
        header[name] = {
            "dtype": dtype_name(dtype),
            "shape": [int(d) for d in shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % ALIGNMENT)
    return struct.pack("<Q", len(text)) + text
