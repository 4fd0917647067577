"""GGUF files (llama.cpp's format) read like a Hugging Face checkpoint, plus the tokenizer they carry.

`GGUFCheckpoint` has HFCheckpoint's interface: canonical tensor names, Hugging Face layout and float32
on demand, one tensor at a time. llama.cpp's converter stores a llama model with Q and K rows permuted for
its interleaved RoPE and with every shape reversed; both are undone here, and quantized blocks are
expanded by gguf-py's own `gguf.quants.dequantize`.

The header is parsed by a small bounds-checked scanner instead of `gguf.GGUFReader`: the reader builds
numpy views per array element (5 s for SmolLM2's 100k tokens+merges, ~20 s for a Llama-3 vocabulary) and
follows corrupt counts without bound. The scanner checks every count and length against the bytes that
remain before using it, so a hostile file fails in milliseconds; the test suite checks that both parse
the same metadata and tensor table.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from kanana_quant import names
from kanana_quant.config import ModelConfig
from kanana_quant.errors import KananaQuantError
from kanana_quant.rope import attention_factor_from_llamacpp
from kanana_quant.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------------------
# Header scanner
# ---------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------
# Hugging Face config from llama metadata
# ---------------------------------------------------------------------------------------------------------

ARCH = "llama"
ROPE_FREQS = "rope_freqs.weight"
_REQUIRED = object()


def _f32(value: float) -> float:
    # GGUF stores floats as f32; the shortest decimal that round-trips gives back the config's 1e-05, not
    # 9.999999747378752e-06.
    return float(str(np.float32(value)))


class _Meta:
    """Typed access to llama.* metadata with one-line errors."""

    def __init__(self, meta: dict, source: str):
        self.meta, self.source = meta, source

    def integer(self, key: str, default=_REQUIRED, uniform: bool = False):
        value = self.meta.get(key)
        if value is None:
            if default is _REQUIRED:
                raise KananaQuantError(f"{self.source}: GGUF metadata has no {key!r}; not a complete llama GGUF")
            return default
        if uniform and isinstance(value, list) and value and len(set(value)) == 1:
            value = value[0]  # per-layer arrays that repeat one value are a plain value
        if isinstance(value, list):
            raise KananaQuantError(f"{self.source}: {key} differs between layers ({value[:4]}...); "
                                   "kanana-quant needs every layer alike")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise KananaQuantError(f"{self.source}: {key} must be a non-negative integer, got {repr(value)[:60]}")
        return value

    def number(self, key: str, default=_REQUIRED):
        value = self.meta.get(key)
        if value is None:
            if default is _REQUIRED:
                raise KananaQuantError(f"{self.source}: GGUF metadata has no {key!r}; not a complete llama GGUF")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KananaQuantError(f"{self.source}: {key} must be a number, got {repr(value)[:60]}")
        return _f32(value)

    def text(self, key: str, default=_REQUIRED):
        value = self.meta.get(key)
        if value is None and default is not _REQUIRED:
            return default
        if not isinstance(value, str):
            raise KananaQuantError(f"{self.source}: GGUF metadata {key!r} must be a string, got {repr(value)[:60]}")
        return value


def _rope_scaling(m: _Meta) -> dict | None:
    p = f"{ARCH}.rope.scaling."
    kind = m.text(p + "type", "none")
    if kind == "none" and f"{ARCH}.rope.scale_linear" in m.meta:  # the pre-2024 key
        return {"rope_type": "linear", "factor": m.number(f"{ARCH}.rope.scale_linear")}
    if kind == "none":
        return None
    if m.number(p + "attn_factor", 1.0) != 1.0:
        raise KananaQuantError(f"{m.source}: {p}attn_factor is not supported")
    if kind == "linear":
        return {"rope_type": "linear", "factor": m.number(p + "factor")}
    if kind != "yarn":
        raise KananaQuantError(f"{m.source}: RoPE scaling {kind!r} is not supported (none, linear, yarn)")
    if m.number(p + "yarn_ext_factor", 1.0) != 1.0 or m.number(p + "yarn_log_multiplier", 0.0) != 0.0:
        raise KananaQuantError(f"{m.source}: YaRN ext_factor/log_multiplier variants are not supported")
    block = {"rope_type": "yarn", "factor": m.number(p + "factor"),
             "original_max_position_embeddings": m.integer(p + "original_context_length"),
             "beta_fast": m.number(p + "yarn_beta_fast", None), "beta_slow": m.number(p + "yarn_beta_slow", None),
             "attention_factor": m.number(p + "yarn_attn_factor", None)}
    if block["attention_factor"] is not None:  # llama.cpp's key multiplies the 1 + 0.1·ln(factor) it derives
        block["attention_factor"] = attention_factor_from_llamacpp(block["attention_factor"], block["factor"])
    return {k: v for k, v in block.items() if v is not None}


def _llama3_rope(factors: np.ndarray, theta: float, head_dim: int, source: str) -> dict:
    """Llama-3.1-style RoPE, which the converter stores as per-frequency divisors (`rope_freqs`) instead of
    parameters. The parameters are recovered (low/high freq factors 1 and 4 as in every Llama 3.x) and
    accepted only if they regenerate the stored divisors."""
    factors = factors.astype(np.float64)
    if factors.shape != (head_dim // 2,):
        raise KananaQuantError(f"{source}: {ROPE_FREQS} has shape {factors.shape}, expected ({head_dim // 2},)")
    factor = _f32(factors.max())
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    blended = np.flatnonzero((factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6)))
    original = 8192  # the converter's default when the band between falls on no frequency
    if blended.size:
        j = blended[0]
        smooth = (1 / factors[j] - 1 / factor) / (1 - 1 / factor)
        original = int(round((3 * smooth + 1) * wavelen[j]))
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": original}
    if not np.allclose(_llama3_factors(params, wavelen), factors, rtol=1e-5, atol=0):
        raise KananaQuantError(f"{source}: {ROPE_FREQS} does not match Llama-3 RoPE scaling; this RoPE variant "
                               "is not supported")
    return params


def _llama3_factors(p: dict, wavelen: np.ndarray) -> np.ndarray:
    # The converter's own formula (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors).
    old, low, high, factor = (p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"],
                              p["factor"])
    smooth = (old / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, blended))


def _vocab_size(m: _Meta, tensors: dict[str, GGUFTensorInfo]) -> int:
    size = m.integer(f"{ARCH}.vocab_size", None)
    if size is None and isinstance(m.meta.get("tokenizer.ggml.tokens"), list):
        size = len(m.meta["tokenizer.ggml.tokens"])
    if size is None and "token_embd.weight" in tensors:
        size = tensors["token_embd.weight"].shape[0]
    return size or 0


def _special_ids(meta: dict, where: str) -> tuple[int | None, list[int]]:
    def token_id(kind: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{kind}_token_id")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise KananaQuantError(f"{where}: tokenizer.ggml.{kind}_token_id must be an integer, got "
                                   f"{repr(value)[:40]}; the GGUF is corrupt")
        return value

    eos = [token_id(k) for k in ("eos", "eot", "eom")]
    return token_id("bos"), list(dict.fromkeys(i for i in eos if i is not None))


def hf_config_from_gguf(meta: dict, tensors: dict[str, GGUFTensorInfo], source: str,
                        rope_freqs: np.ndarray | None = None) -> dict:
    """A Hugging Face config.json dict equivalent to a llama GGUF's metadata (for ModelConfig.from_hf)."""
    m = _Meta(meta, source)
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise KananaQuantError(f"{source}: GGUF architecture {arch!r} is not supported; kanana-quant reads "
                               f"'{ARCH}' GGUFs (Llama, Kanana, Mixtral-style MoE)")
    p = f"{ARCH}."
    hidden, heads = m.integer(p + "embedding_length"), m.integer(p + "attention.head_count")
    kv_heads = m.integer(p + "attention.head_count_kv", heads, uniform=True)
    head_dim = m.integer(p + "attention.key_length", None) or m.integer(p + "rope.dimension_count", None)
    head_dim = head_dim or (hidden // heads if heads else 0)
    if m.integer(p + "attention.value_length", head_dim) != head_dim:
        raise KananaQuantError(f"{source}: key and value head sizes differ; not supported")
    if m.integer(p + "rope.dimension_count", head_dim) != head_dim:
        raise KananaQuantError(f"{source}: RoPE covers {m.integer(p + 'rope.dimension_count')} of {head_dim} head "
                               "dimensions; partial rotary embeddings are not supported")
    theta = m.number(p + "rope.freq_base", 10000.0)
    experts = m.integer(p + "expert_count", 0)
    bos, eos = _special_ids(meta, source)
    raw = {
        "architectures": ["MixtralForCausalLM" if experts else "LlamaForCausalLM"],
        "model_type": "mixtral" if experts else "llama",
        "vocab_size": _vocab_size(m, tensors),
        "hidden_size": hidden,
        "intermediate_size": m.integer(p + "expert_feed_forward_length", None) if experts else None,
        "num_hidden_layers": m.integer(p + "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": m.number(p + "attention.layer_norm_rms_epsilon"),
        "rope_theta": theta,
        "max_position_embeddings": m.integer(p + "context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos or None,
        "torch_dtype": "float32",
    }
    raw["intermediate_size"] = raw["intermediate_size"] or m.integer(p + "feed_forward_length", uniform=True)
    if experts:
        raw["num_local_experts"] = experts
        raw["num_experts_per_tok"] = m.integer(p + "expert_used_count")
    scaling = _rope_scaling(m)
    if rope_freqs is not None:
        if scaling:
            raise KananaQuantError(f"{source}: both {ROPE_FREQS} and rope.scaling metadata; not supported")
        scaling = _llama3_rope(rope_freqs, theta, head_dim, source)
    if scaling:
        raw["rope_scaling"] = scaling
    return raw


# ---------------------------------------------------------------------------------------------------------
# The checkpoint
# ---------------------------------------------------------------------------------------------------------

GLOBAL_GGUF = {"embed": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight"}
LAYER_GGUF = {"attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
              "ffn_norm": "ffn_norm", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down",
              "router": "ffn_gate_inp"}


@lru_cache(maxsize=None)
def can_dequantize(ggml_type: GGMLQuantizationType) -> bool:
    """Whether gguf-py can expand this type (probed on one zero block, so new gguf-py types just work)."""
    block, size = GGML_QUANT_SIZES[ggml_type]
    try:
        dequantize(np.zeros((1, size), dtype=np.uint8), ggml_type)
    except (NotImplementedError, ValueError, TypeError, KeyError):
        return False
    return True


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute: per head, llama.cpp interleaves the two rotary halves
    (rows 0, d/2, 1, d/2+1, ...); Hugging Face keeps them as two blocks."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class _Source:
    info: GGUFTensorInfo
    expert: int | None = None  # index into a stacked *_exps tensor
    heads: int | None = None  # rows to un-permute with this many heads (Q, K)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape[1:] if self.expert is not None else self.info.shape


class GGUFCheckpoint:
    """A llama-architecture GGUF file read lazily (mmap) by canonical tensor name, dequantized on demand."""

    def __init__(self, path: str | Path, config: ModelConfig | None = None):
        self.path = Path(path)
        self.dir = self.path.parent
        self.header = read_gguf_header(self.path)
        self.metadata = self.header.metadata
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        if config is None:
            raw = hf_config_from_gguf(self.metadata, self.header.tensors, str(self.path), self._rope_freqs())
            config = ModelConfig.from_hf(raw, str(self.path))
        self.config = config
        self._sources = {name: self._source(name) for name in names.canonical_names(config)}
        self._check_tensors()

    # -- mapping ------------------------------------------------------------------------------------------

    def _rope_freqs(self) -> np.ndarray | None:
        info = self.header.tensors.get(ROPE_FREQS)
        return None if info is None else self._expand(info)

    def _info(self, gguf_name: str) -> GGUFTensorInfo:
        info = self.header.tensors.get(gguf_name)
        if info is None:
            raise KananaQuantError(f"{self.path}: tensor {gguf_name!r} is missing; the GGUF is incomplete or not "
                                   "a llama model")
        return info

    def _source(self, name: str) -> _Source:
        if name in GLOBAL_GGUF:
            return _Source(self._info(GLOBAL_GGUF[name]))
        _, layer, role = name.split(".", 2)
        if role.startswith("experts."):
            _, expert, proj = role.split(".")
            stacked = f"blk.{layer}.{LAYER_GGUF[proj]}_exps.weight"
            if stacked in self.header.tensors:
                return _Source(self._info(stacked), expert=int(expert))
            return _Source(self._info(f"blk.{layer}.{LAYER_GGUF[proj]}.{expert}.weight"))  # pre-2024 layout
        if role not in LAYER_GGUF:
            raise KananaQuantError(f"{self.path}: the GGUF reader has no tensor for role {role!r}")
        heads = {"q": self.config.num_heads, "k": self.config.num_kv_heads}.get(role)
        return _Source(self._info(f"blk.{layer}.{LAYER_GGUF[role]}.weight"), heads=heads)

    def _check_tensors(self) -> None:
        for name, src in self._sources.items():
            expected = names.tensor_shape(self.config, name)
            if src.expert is not None and src.info.shape[0] != self.config.moe.num_experts:
                raise KananaQuantError(f"{self.path}: {src.info.name!r} stacks {src.info.shape[0]} experts, the "
                                       f"metadata says {self.config.moe.num_experts}")
            if src.shape != expected:
                raise KananaQuantError(f"{self.path}: tensor {src.info.name!r} has shape {list(src.shape)}, the "
                                       f"metadata implies {list(expected)}; the GGUF is inconsistent")
            if not can_dequantize(src.info.ggml_type):
                raise KananaQuantError(f"{self.path}: tensor {src.info.name!r} is {src.info.ggml_type.name}, which "
                                       "gguf-py cannot dequantize; upgrade gguf or requantize the model")
        used = {src.info.name for src in self._sources.values()} | {ROPE_FREQS}
        extra = sorted(set(self.header.tensors) - used)
        if extra:
            raise KananaQuantError(f"{self.path}: unexpected tensor {extra[0]!r} ({len(extra)} in all); this llama "
                                   "GGUF has parts kanana-quant does not model (biases? a different architecture?)")

    # -- reading ------------------------------------------------------------------------------------------

    def _expand(self, info: GGUFTensorInfo, expert: int | None = None) -> np.ndarray:
        if self._data is None:
            raise KananaQuantError(f"{self.path}: checkpoint is closed")
        start, nbytes, shape = info.offset, info.nbytes, info.byte_shape
        if expert is not None:  # one expert of a stacked tensor is one contiguous slice
            nbytes //= shape[0]
            start += expert * nbytes
            shape = shape[1:]
        raw = self._data[start:start + nbytes].reshape(shape)
        try:
            values = dequantize(raw, info.ggml_type)
        except NotImplementedError:
            raise KananaQuantError(f"{self.path}: cannot dequantize {info.ggml_type.name}") from None
        # F32/F16 come back as views or casts of the mapped file; a caller must own what it gets.
        return values.copy() if np.may_share_memory(values, raw) else values

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        """One tensor by canonical name in Hugging Face layout, dequantized to float32, then cast to `dtype`."""
        src = self._sources[name]
        w = self._expand(src.info, src.expert)
        if src.heads:
            w = unpermute_rows(w, src.heads)
        return np.ascontiguousarray(w).astype(dtype, copy=False)

    def layer(self, index: int, dtype=np.float32) -> dict[str, np.ndarray]:
        return {role: self.get(f"layers.{index}.{role}", dtype) for role in names.layer_roles(self.config)}

    @property
    def names(self) -> list[str]:
        return list(self._sources)

    def tensor_type(self, name: str) -> str:
        """The GGML storage type of a canonical tensor: 'F32', 'Q4_K', ..."""
        return self._sources[name].info.ggml_type.name

    def dtype(self, name: str) -> str:
        """The safetensors dtype a float copy of this tensor is written in: its own for float types, else
        F16 (as GPTQ checkpoints store unquantized tensors; F32 would double a Q8_0 embedding twice over)."""
        kind = self.tensor_type(name)
        return kind if kind in ("F32", "F16", "BF16") else "F16"

    def is_quantized(self, name: str) -> bool:
        return False  # dequantized block by block on read; the runtime sees float weights

    def nbytes(self) -> int:
        """Bytes the model's tensors occupy in the file (stacked expert tensors counted once)."""
        return sum({src.info.name: src.info.nbytes for src in self._sources.values()}.values())

    def close(self) -> None:
        self._data = None  # numpy unmaps when the last view goes

    def __enter__(self) -> "GGUFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------
# Tokenizer from tokenizer.ggml.* metadata
# ---------------------------------------------------------------------------------------------------------

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

# Pre-tokenizer regexes by tokenizer.ggml.pre, as llama.cpp's llama-vocab.cpp applies them: each regex
# splits the pieces of the one before, keeping what it does not match, i.e. tokenizers' Split "isolated".
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_GROUPS = [
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), (_LLAMA3,)),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), (r"\p{N}", _GPT2)),
    (("gpt2", "mpt", "olmo", "jais"), (_GPT2,)),
    (("qwen2", "stablelm2", "deepseek-r1-qwen"), (_QWEN2,)),
    (("default",), (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
]
PRE_TOKENIZER_SPLITS = {name: splits for group, splits in _PRE_GROUPS for name in group}
# llama.cpp matches a whole pre-token that is in the vocabulary before merging only for these (as the
# Llama-3 tokenizer.json's "ignore_merges": true does).
IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the spelling of every byte-level BPE token."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _metadata_of(source) -> tuple[dict, str]:
    if isinstance(source, GGUFCheckpoint):
        return source.metadata, str(source.path)
    if isinstance(source, (str, Path)):
        return read_gguf_header(source).metadata, str(source)
    if isinstance(source, GGUFReader):
        meta = {k: f.contents() for k, f in source.fields.items() if not k.startswith("GGUF.")}
        return meta, str(getattr(source.data, "filename", "GGUF"))
    raise TypeError(f"expected a GGUF path, GGUFCheckpoint or gguf.GGUFReader, got {type(source).__name__}")


def _token_lists(meta: dict, where: str) -> tuple[list[str], list[int], list[tuple[str, str]]]:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise KananaQuantError(f"{where}: GGUF has no tokenizer.ggml.tokens; it carries no tokenizer")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list) or not isinstance(types, list) or len(types) != len(tokens):
        raise KananaQuantError(f"{where}: byte-level BPE tokenizer without merges (or with mismatched token "
                               "types); the GGUF is incomplete")
    if not isinstance(tokens[0], str) or not isinstance(merges[0] if merges else "", str):
        raise KananaQuantError(f"{where}: tokenizer.ggml.tokens and .merges must be arrays of strings; the GGUF "
                               "is corrupt")
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise KananaQuantError(f"{where}: a tokenizer merge is not two tokens separated by one space; corrupt")
    return tokens, list(types), pairs


def _pre_tokenizer(pre: str, where: str):
    splits = PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        raise KananaQuantError(f"{where}: pre-tokenizer {pre!r} is not supported; supported: "
                               f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))}")
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])


def _post_processor(tokens: list[str], meta: dict, add_bos: bool):
    steps = [processors.ByteLevel(trim_offsets=False)]
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    add_bos = add_bos and bos is not None
    if add_bos or add_eos:
        single, pair, special = "$A", "$A $B", {}
        if add_bos:
            single, pair = f"{tokens[bos]} {single}", f"{tokens[bos]} $A {tokens[bos]} $B"
            special[tokens[bos]] = bos
        if add_eos:
            single, pair = f"{single} {tokens[eos]}", f"{pair} {tokens[eos]}"
            special[tokens[eos]] = eos
        steps.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(special.items())))
    return processors.Sequence(steps)


def _build_bpe(tokens: list[str], types: list[int], pairs, pre: str, where: str) -> HFTokenizer:
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    # Added tokens are stored as plain text (llama.cpp's pre-normalized form); inside the BPE model every
    # token must be spelled in the byte alphabet, as transformers' GGUF converter does too.
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        spelled = token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(spelled, i)
    try:
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in IGNORE_MERGES,
                                     fuse_unk=False, byte_fallback=False))
    except Exception as e:  # tokenizers raises a bare Exception for merges outside the vocabulary
        raise KananaQuantError(f"{where}: tokenizer does not load ({str(e).splitlines()[0][:160]})") from None
    tok.pre_tokenizer = _pre_tokenizer(pre, where)
    tok.decoder = decoders.ByteLevel()
    in_alphabet = [set(t) <= alphabet for t in tokens]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind, ok in zip(tokens, types, in_alphabet) if kind == CONTROL and ok])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind, ok in zip(tokens, types, in_alphabet) if kind == USER_DEFINED and ok])
    return tok


def gguf_tokenizer(reader_or_path) -> Tokenizer:
    """The byte-level BPE tokenizer stored in a GGUF's tokenizer.ggml.* metadata, as our Tokenizer."""
    meta, where = _metadata_of(reader_or_path)
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise KananaQuantError(f"{where}: GGUF tokenizer model {model!r} is not supported; kanana-quant builds "
                               "byte-level BPE ('gpt2') tokenizers, as Llama-3 and Kanana use")
    tokens, types, pairs = _token_lists(meta, where)
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if not isinstance(pre, str):
        raise KananaQuantError(f"{where}: tokenizer.ggml.pre must be a string, got {repr(pre)[:40]}")
    bos, eos_ids = _special_ids(meta, where)
    for token_id in [bos, *eos_ids]:
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise KananaQuantError(f"{where}: special token id {token_id} is outside the {len(tokens)}-token "
                                   "vocabulary")
    tok = _build_bpe(tokens, types, pairs, pre, where)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", pre in IGNORE_MERGES))
    tok.post_processor = _post_processor(tokens, meta, add_bos)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    config = {"bos_token": tokens[bos] if bos is not None else None,
              "eos_token": tokens[eos] if isinstance(eos, int) else None,
              "chat_template": meta.get("tokenizer.chat_template"),
              "add_bos_token": add_bos}
    return Tokenizer(tok, config, where, extra_eos_ids=eos_ids)
