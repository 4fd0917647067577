"""Lazy, validated safetensors reading (mmap) and streaming, atomic writing.

Why not the `safetensors` package here: its numpy backend can read neither bf16 (Kanana's dtype) nor write
tensors one at a time, and a 31 GB MoE must be written while it is produced. The format is small: an 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data. Every field
is checked before use so a hostile file fails with one line and no huge allocation.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from kanana_quant.atomic import atomic_file
from kanana_quant.errors import KananaQuantError

MAX_HEADER_BYTES = 100 << 20  # the same cap as the reference implementation

# safetensors dtype -> numpy storage dtype (BF16 is stored as raw uint16 and widened on read).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even to bfloat16 bits (NaN kept NaN), as torch does."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return np.where(np.isnan(x), 0x7FC0, rounded).astype(np.uint16)


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return x if x.dtype == np.uint16 else f32_to_bf16(x)  # uint16: already bf16 bits (a raw copy)
    return np.ascontiguousarray(x, dtype=DTYPES[dtype])


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One .safetensors file, header parsed and checked, tensors read lazily through one mmap."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors, self.metadata = _read_header(self.path)
        self._mmap: np.memmap | None = None

    def _buffer(self) -> np.memmap:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap

    def raw(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype (BF16 as uint16 bits), a read-only view of the mapped file."""
        info = self.tensors[name]
        data = self._buffer()[info.start:info.end]
        return data.view(DTYPES[info.dtype]).reshape(info.shape)

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        """The tensor converted to `dtype` (a copy in memory; floats only)."""
        info = self.tensors[name]
        raw = self.raw(name)
        if info.dtype == "BF16":
            return bf16_to_f32(raw).astype(dtype, copy=False)
        return raw.astype(dtype)

    def close(self) -> None:
        self._mmap = None


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise KananaQuantError(f"{path}: truncated safetensors file ({size} bytes); re-download it")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise KananaQuantError(f"{path}: corrupt safetensors header length {n} (file is {size} bytes); "
                                       "re-download it")
            header_bytes = f.read(n)
    except OSError as e:
        raise KananaQuantError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, over-long integers, nesting past the stack
        raise KananaQuantError(f"{path}: corrupt safetensors header (not JSON); re-download it") from None
    if not isinstance(header, dict):
        raise KananaQuantError(f"{path}: corrupt safetensors header (not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise KananaQuantError(f"{path}: corrupt safetensors __metadata__ (not an object of strings)")
    base, data_size = 8 + n, size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _check_entry(path, name, entry, base, data_size)
    spans = sorted((t.start, t.end, name) for name, t in tensors.items())
    for (s0, e0, a), (s1, _, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise KananaQuantError(f"{path}: tensors {a!r} and {b!r} overlap; the file is corrupt")
    return tensors, dict(metadata)


def _check_entry(path: Path, name: str, entry, base: int, data_size: int) -> TensorInfo:
    bad = f"{path}: corrupt entry for tensor {name[:80]!r}"
    if not isinstance(entry, dict):
        raise KananaQuantError(bad)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise KananaQuantError(f"{path}: tensor {name[:80]!r} has unsupported dtype {repr(dtype)[:40]}")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
        raise KananaQuantError(f"{bad} (shape {repr(shape)[:60]})")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise KananaQuantError(f"{bad} (data_offsets {repr(offsets)[:60]})")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise KananaQuantError(f"{path}: tensor {name[:80]!r} lies outside the file (offsets {begin}..{end}, "
                               f"data is {data_size} bytes); the file is truncated or corrupt")
    if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        raise KananaQuantError(f"{bad}: {end - begin} bytes do not hold a {dtype} tensor of shape {shape}")
    return TensorInfo(dtype, tuple(shape), base + begin, base + end)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, safetensors dtype and shape, known before its data exists."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def _header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for spec in specs:
        if spec.dtype not in DTYPES:
            raise ValueError(f"unknown safetensors dtype {spec.dtype}")
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(blob)) + blob


def write_safetensors(path: str | Path, specs: Iterable[TensorSpec],
                      produce: Callable[[TensorSpec], np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write tensors one at a time: `produce(spec)` is called in order and its result dropped after writing.

    The file appears under `path` only once complete (temp file, fsync, rename).
    """
    specs = list(specs)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(_header(specs, metadata))
        for spec in specs:
            array = to_storage(produce(spec), spec.dtype)
            if array.shape != spec.shape:
                raise ValueError(f"{spec.name}: produced shape {array.shape}, declared {spec.shape}")
            if array.size:  # memoryview cannot cast an empty array
                f.write(memoryview(array).cast("B"))
        f.flush()
