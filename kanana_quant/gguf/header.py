"""The GGUF header: metadata and the tensor table, read by a small bounds-checked scanner.

Not `gguf.GGUFReader`: the reader builds numpy views per array element (5 s for SmolLM2's 100k tokens+merges,
~20 s for a Llama-3 vocabulary) and follows corrupt counts without bound. The scanner checks every count and
length against the bytes that remain before using it, so a hostile file fails in milliseconds; the test suite
checks that both parse the same metadata and tensor table.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from kanana_quant.errors import KananaQuantError


MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 1 << 48
STRING, ARRAY = 8, 9
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
# Smallest possible encodings, used to reject counts the remaining bytes cannot hold.
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: GGUF's dimension list reversed
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """The shape of the raw bytes: rows of whole blocks along the last (contiguous) axis."""
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return (*self.shape[:-1], self.shape[-1] // block * size)


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # scalars as Python values, strings as str, arrays as lists
    tensors: dict[str, GGUFTensorInfo]
    data_offset: int
    file_size: int


class _Cursor:
    """Little-endian reads that never pass the end of the buffer."""

    def __init__(self, buf, source: str):
        self.buf, self.pos, self.source, self.end = buf, 0, source, len(buf)

    def corrupt(self, what: str) -> KananaQuantError:
        return KananaQuantError(f"{self.source}: truncated or corrupt GGUF ({what} at byte {self.pos} runs past "
                                f"the end of the {self.end}-byte file); re-download it")

    def take(self, n: int, what: str) -> int:
        if n < 0 or n > self.end - self.pos:
            raise self.corrupt(what)
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str, what: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        start = self.take(n, what)
        return _utf8(self.buf[start:start + n], what, self.source)


def _utf8(raw: bytes, what: str, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KananaQuantError(f"{source}: {what} is not valid UTF-8; the GGUF file is corrupt") from None


def _string_array(cur: _Cursor, count: int, what: str) -> list[str]:
    if count > (cur.end - cur.pos) // 8:
        raise cur.corrupt(f"{what} ({count} strings)")
    buf, pos, end, out = cur.buf, cur.pos, cur.end, []
    for _ in range(count):  # the hot loop of a header: one pass, locals only
        if pos + 8 > end:
            cur.pos = pos
            raise cur.corrupt(what)
        (n,) = _U64.unpack_from(buf, pos)
        pos += 8
        if n > end - pos:
            cur.pos = pos
            raise cur.corrupt(what)
        out.append(buf[pos:pos + n])
        pos += n
    cur.pos = pos
    try:
        return [raw.decode("utf-8") for raw in out]
    except UnicodeDecodeError:
        raise KananaQuantError(f"{cur.source}: {what} holds invalid UTF-8; the GGUF file is corrupt") from None


def _value(cur: _Cursor, vtype: int, what: str) -> Any:
    if vtype in _SCALARS:
        return cur.scalar(_SCALARS[vtype], what)
    if vtype == STRING:
        return cur.string(what)
    if vtype != ARRAY:
        raise KananaQuantError(f"{cur.source}: {what} has unknown GGUF value type {vtype}; the file is corrupt")
    itype, count = cur.scalar("<I", what), cur.scalar("<Q", what)
    if itype == STRING:
        return _string_array(cur, count, what)
    if itype not in _SCALARS:
        raise KananaQuantError(f"{cur.source}: {what} is an array of type {itype}; only arrays of numbers and "
                               "strings are supported")
    dtype = np.dtype(_SCALARS[itype])
    if count > (cur.end - cur.pos) // dtype.itemsize:
        raise cur.corrupt(f"{what} ({count} elements)")
    start = cur.take(count * dtype.itemsize, what)
    return np.frombuffer(cur.buf, dtype=dtype, count=count, offset=start).tolist()


def _tensor_entry(cur: _Cursor) -> tuple[str, list[int], int, int]:
    name = cur.string("tensor name")
    n_dims = cur.scalar("<I", f"tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise KananaQuantError(f"{cur.source}: tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed); "
                               "the GGUF file is corrupt")
    dims = [cur.scalar("<Q", f"tensor {name!r}") for _ in range(n_dims)]
    ggml_type = cur.scalar("<I", f"tensor {name!r}")
    offset = cur.scalar("<Q", f"tensor {name!r}")
    return name, dims, ggml_type, offset


def _tensor_info(entry, data_offset: int, alignment: int, size: int, source: str) -> GGUFTensorInfo:
    name, dims, raw_type, rel = entry

    def bad(why: str) -> KananaQuantError:
        return KananaQuantError(f"{source}: tensor {name!r} {why}; the GGUF file is corrupt or truncated")

    try:
        ggml_type = GGMLQuantizationType(raw_type)
    except ValueError:
        raise bad(f"has unknown ggml type {raw_type}") from None
    if any(d <= 0 for d in dims) or math.prod(dims) > MAX_ELEMENTS:
        raise bad(f"has impossible dimensions {dims}")
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if dims[0] % block:
        raise bad(f"has a row of {dims[0]} values, not whole {ggml_type.name} blocks of {block}")
    nbytes = math.prod(dims) // block * type_size
    if rel % alignment:
        raise bad(f"starts at offset {rel}, not a multiple of the alignment {alignment}")
    end = data_offset + rel + nbytes
    if end > size:
        raise bad(f"ends at byte {end} but the file has {size} bytes")
    return GGUFTensorInfo(name, tuple(reversed(dims)), ggml_type, data_offset + rel, nbytes)


def _open_header(cur: _Cursor, size: int) -> tuple[int, int, int]:
    source = cur.source
    if bytes(cur.buf[:4]) != MAGIC:
        raise KananaQuantError(f"{source}: not a GGUF file (starts with {bytes(cur.buf[:4])!r}, not b'GGUF')")
    cur.take(4, "magic")
    version = cur.scalar("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0:
            raise KananaQuantError(f"{source}: big-endian GGUF is not supported; convert it on a little-endian "
                                   "machine")
        raise KananaQuantError(f"{source}: GGUF version {version} is not supported (only 2 and 3)")
    n_tensors, n_kv = cur.scalar("<Q", "tensor count"), cur.scalar("<Q", "metadata count")
    left = size - cur.pos
    if n_kv > left // MIN_KV_BYTES or n_tensors > left // MIN_TENSOR_INFO_BYTES:
        raise KananaQuantError(f"{source}: header declares {n_tensors} tensors and {n_kv} metadata entries, more "
                               f"than a {size}-byte file can hold; the file is corrupt")
    return version, n_tensors, n_kv


def _metadata(cur: _Cursor, n_kv: int) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        vtype = cur.scalar("<I", f"metadata {key!r}")
        if key in meta:
            raise KananaQuantError(f"{cur.source}: metadata key {key!r} appears twice; the GGUF file is corrupt")
        meta[key] = _value(cur, vtype, f"metadata {key!r}")
    return meta


def _alignment(meta: dict, source: str) -> int:
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise KananaQuantError(f"{source}: general.alignment {alignment!r} is not a power of two")
    return alignment


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse and validate a GGUF header: metadata, and a tensor table whose extents fit inside the file."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise KananaQuantError(f"{source}: no such GGUF file")
    size = path.stat().st_size
    if size < 24:
        raise KananaQuantError(f"{source}: {size} bytes is too small for a GGUF file; re-download it")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, source)
            version, n_tensors, n_kv = _open_header(cur, size)
            meta = _metadata(cur, n_kv)
            entries = [_tensor_entry(cur) for _ in range(n_tensors)]
            header_end = cur.pos
    except OSError as e:
        raise KananaQuantError(f"{source}: cannot read ({e.strerror or e})") from None
    alignment = _alignment(meta, source)
    data_offset = -(-header_end // alignment) * alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    for entry in entries:
        if entry[0] in tensors:
            raise KananaQuantError(f"{source}: tensor {entry[0]!r} appears twice; the GGUF file is corrupt")
        tensors[entry[0]] = _tensor_info(entry, data_offset, alignment, size, source)
    return GGUFHeader(version, meta, tensors, data_offset, size)
