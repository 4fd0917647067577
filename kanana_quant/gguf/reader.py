"""GGUF files (llama.cpp's format) read like a Hugging Face checkpoint.

`GGUFCheckpoint` implements the Weights interface: canonical tensor names, Hugging Face layout and float32
on demand, one tensor at a time. llama.cpp's converter stores a llama model with Q and K rows permuted for
its interleaved RoPE and with every shape reversed; both are undone here, and quantized blocks are
expanded by gguf-py's own `gguf.quants.dequantize`. The config comes from the llama.* metadata; the
tokenizer from tokenizer.ggml.* (gguf.vocab).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from kanana_quant import names
from kanana_quant.config import ModelConfig
from kanana_quant.errors import KananaQuantError
from kanana_quant.gguf.header import GGUFTensorInfo, read_gguf_header
from kanana_quant.gguf.names import (ARCH_NAME, EXPERT_TENSORS, GLOBAL_TENSORS, LAYER_TENSORS, ROPE_FREQS,
                                     legacy_expert_name, tensor_name, unpermute_qk)
from kanana_quant.gguf.vocab import gguf_tokenizer, special_ids
from kanana_quant.rope import attention_factor_from_llamacpp, llama3_divisors
from kanana_quant.safetensors_io import to_storage
from kanana_quant.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------------------
# Hugging Face config from llama metadata
# ---------------------------------------------------------------------------------------------------------

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
    p = f"{ARCH_NAME}.rope.scaling."
    kind = m.text(p + "type", "none")
    if kind == "none" and f"{ARCH_NAME}.rope.scale_linear" in m.meta:  # the pre-2024 key
        return {"rope_type": "linear", "factor": m.number(f"{ARCH_NAME}.rope.scale_linear")}
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
    if not np.allclose(llama3_divisors(wavelen, factor, 1.0, 4.0, original), factors, rtol=1e-5, atol=0):
        raise KananaQuantError(f"{source}: {ROPE_FREQS} does not match Llama-3 RoPE scaling; this RoPE variant "
                               "is not supported")
    return params


def _vocab_size(m: _Meta, tensors: dict[str, GGUFTensorInfo]) -> int:
    size = m.integer(f"{ARCH_NAME}.vocab_size", None)
    if size is None and isinstance(m.meta.get("tokenizer.ggml.tokens"), list):
        size = len(m.meta["tokenizer.ggml.tokens"])
    if size is None and tensor_name(GLOBAL_TENSORS["embed"]) in tensors:
        size = tensors[tensor_name(GLOBAL_TENSORS["embed"])].shape[0]
    return size or 0


def hf_config_from_gguf(meta: dict, tensors: dict[str, GGUFTensorInfo], source: str,
                        rope_freqs: np.ndarray | None = None) -> dict:
    """A Hugging Face config.json dict equivalent to a llama GGUF's metadata (for ModelConfig.from_hf)."""
    m = _Meta(meta, source)
    arch = meta.get("general.architecture")
    if arch != ARCH_NAME:
        raise KananaQuantError(f"{source}: GGUF architecture {arch!r} is not supported; kanana-quant reads "
                               f"'{ARCH_NAME}' GGUFs (Llama, Kanana, Mixtral-style MoE)")
    p = f"{ARCH_NAME}."
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
    bos, eos = special_ids(meta, source)
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
        "tie_word_embeddings": tensor_name(GLOBAL_TENSORS["lm_head"]) not in tensors,
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
    if meta.get(p + "attention.causal", True) is False or p + "pooling_type" in meta:
        raw.update(_encoder_keys(meta, source))
    return raw


POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}  # llama.cpp's LLAMA_POOLING_TYPE_*


def _encoder_keys(meta: dict, source: str) -> dict:
    """config.json keys of an embedding GGUF (config.py checks them): llama.cpp's causal and pooling keys, and
    our kanana_quant.embedding for the query format."""
    from kanana_quant.errors import parse_json

    p = f"{ARCH_NAME}."
    pooling = meta.get(p + "pooling_type", 0)
    ours = meta.get("kanana_quant.embedding")
    extra = parse_json(ours, f"{source}: kanana_quant.embedding") if isinstance(ours, str) else {}
    if not isinstance(extra, dict):
        raise KananaQuantError(f"{source}: kanana_quant.embedding is not a JSON object; re-export the GGUF")
    keys = {k: extra[k] for k in ("query_prefix", "pool_instruction", "max_length", "matryoshka_dimensions")
            if k in extra}
    arch = extra.get("architecture") if extra.get("architecture") == "Kanana2VecModel" else "LlamaBidirectionalModel"
    return {"architectures": [arch], "model_type": "kanana2vec" if arch == "Kanana2VecModel" else "llama",
            "pooling": POOLING_NAMES.get(pooling, str(pooling)), "is_causal": meta.get(p + "attention.causal", True),
            **keys}


# ---------------------------------------------------------------------------------------------------------
# The checkpoint
# ---------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def can_dequantize(ggml_type: GGMLQuantizationType) -> bool:
    """Whether gguf-py can expand this type (probed on one zero block, so new gguf-py types just work)."""
    block, size = GGML_QUANT_SIZES[ggml_type]
    try:
        dequantize(np.zeros((1, size), dtype=np.uint8), ggml_type)
    except (NotImplementedError, ValueError, TypeError, KeyError):
        return False
    return True


@dataclass(frozen=True)
class _Source:
    info: GGUFTensorInfo
    expert: int | None = None  # index into a stacked *_exps tensor
    heads: int | None = None  # rows to un-permute with this many heads (Q, K)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape[1:] if self.expert is not None else self.info.shape


class GGUFCheckpoint:
    """A llama-architecture GGUF file read lazily (mmap) by canonical tensor name, dequantized on demand.
    Implements weights.Weights."""

    format = None  # float weights as far as readers go: GGML blocks are expanded on read

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
        if name in GLOBAL_TENSORS:
            return _Source(self._info(tensor_name(GLOBAL_TENSORS[name])))
        _, layer, role = name.split(".", 2)
        if role.startswith("experts."):
            _, expert, proj = role.split(".")
            stacked = tensor_name(EXPERT_TENSORS[proj], int(layer))
            if stacked in self.header.tensors:
                return _Source(self._info(stacked), expert=int(expert))
            return _Source(self._info(legacy_expert_name(int(layer), proj, int(expert))))  # pre-2024 layout
        if role not in LAYER_TENSORS:
            raise KananaQuantError(f"{self.path}: the GGUF reader has no tensor for role {role!r}")
        heads = {"q": self.config.num_heads, "k": self.config.num_kv_heads}.get(role)
        suffix = "bias" if role.endswith("_bias") else "weight"
        return _Source(self._info(tensor_name(LAYER_TENSORS[role], int(layer), suffix)), heads=heads)

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
        if self._data is None:  # closed to release the pages read so far: map the file again
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
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
            w = unpermute_qk(w, src.heads)
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

    def raw(self, name: str) -> np.ndarray:
        """The tensor in dtype(name), for copying it into a safetensors checkpoint."""
        return to_storage(self.get(name), self.dtype(name))

    def is_quantized(self, name: str) -> bool:
        return False  # dequantized block by block on read; the runtime sees float weights

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the file carries in its tokenizer.ggml.* metadata."""
        return gguf_tokenizer(self.metadata, str(self.path))

    def nbytes(self) -> int:
        """Bytes the model's tensors occupy in the file (stacked expert tensors counted once)."""
        return sum({src.info.name: src.info.nbytes for src in self._sources.values()}.values())

    def close(self) -> None:
        self._data = None  # numpy unmaps when the last view goes; the next read maps the file again

    def __enter__(self) -> "GGUFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
