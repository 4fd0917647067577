"""GGUF writer: a loaded model (HF float, GGUF, or our quantized checkpoint) written as a llama.cpp `llama` file.

The file is what convert_hf_to_gguf.py followed by llama-quantize would produce: the converter's metadata,
tensor names, Q/K row permutation, stacked MoE experts and tokenizer keys (gguf.names, gguf.vocab), and
llama-quantize's per-role type mix (gguf.mix). Tensors are read, encoded and written one at a time.

Quantized checkpoints are carried over without re-rounding wherever a GGML type holds their grid exactly
(gguf.blocks.carry); everything else is dequantized and quantized to the tensor's type like a float model.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import MODEL_TENSOR as MT

from kanana_quant import names
from kanana_quant.atomic import atomic_file
from kanana_quant.config import ModelConfig
from kanana_quant.errors import KananaQuantError
from kanana_quant.gguf import blocks
from kanana_quant.gguf.mix import file_type_info, tensor_type
from kanana_quant.gguf.names import (ARCH_NAME, EXPERT_TENSORS, GLOBAL_TENSORS, LAYER_TENSORS, permute_qk,
                                     tensor_name)
from kanana_quant.gguf.vocab import add_tokenizer
from kanana_quant.rope import llama3_divisors, llamacpp_yarn
from kanana_quant.weights import Weights

if TYPE_CHECKING:
    from kanana_quant.loader import LoadedModel

log = logging.getLogger(__name__)

T = GGMLQuantizationType
# Bytes already packed for a tensor as a given type, rows in Hugging Face order (quant/gguf_sink's GPTQ on the
# type's own grid), or None: the writer encodes that tensor itself.
PackedBytes = Callable[[str, GGMLQuantizationType], "np.ndarray | None"]


@dataclass(frozen=True)
class TensorReport:
    """One written tensor. exact: None for float sources; True when a quantized source's codes were carried
    bit for bit; False when a quantized source had to be dequantized and quantized again."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    exact: bool | None


@dataclass(frozen=True)
class _Plan:
    gguf_name: str
    shape: tuple[int, ...]  # numpy order; stacked experts lead with the expert axis
    ggml_type: GGMLQuantizationType
    sources: tuple[str, ...] = ()  # canonical names; several = experts stacked in order
    heads: int | None = None  # permute rows as the converter does for Q and K
    constant: np.ndarray | None = None  # generated tensors (rope_freqs)

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return math.prod(self.shape[:-1]) * (self.shape[-1] // block) * size


# ---------------------------------------------------------------------------------------------------------
# What the file can express


def _check_expressible(cfg: ModelConfig) -> None:
    if cfg.qk_norm or cfg.family not in ("llama", "mixtral") or (cfg.moe and cfg.moe.naming != "mixtral"):
        raise KananaQuantError(f"{cfg.architecture}: GGUF export writes llama-architecture files (dense Llama and "
                               "Mixtral-style MoE); this model's per-head q/k norms and MoE layout have no llama "
                               "tensors")
    if cfg.moe and not cfg.moe.norm_topk_prob:
        raise KananaQuantError(f"{cfg.architecture}: llama.cpp's llama MoE always renormalises the top-k router "
                               "weights; this model does not, so its GGUF would compute something else")
    s = cfg.rope_scaling
    if s and s.rope_type == "yarn" and (s.mscale or s.mscale_all_dim or not s.truncate):
        raise KananaQuantError(f"{cfg.architecture}: YaRN with mscale/mscale_all_dim/truncate=false has no llama "
                               "GGUF keys; only factor, original context and beta_fast/slow are expressible")


# ---------------------------------------------------------------------------------------------------------
# The tensor plan


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
    """The converter's rope_freqs: per rotary frequency (computed in float32, as the converter does), the
    divisor Llama-3 RoPE scaling applies."""
    s, dim = cfg.rope_scaling, cfg.head_dim
    freqs = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    wavelen = 2 * math.pi / freqs.astype(np.float64)
    return llama3_divisors(wavelen, s.factor, s.low_freq_factor, s.high_freq_factor,
                           s.original_max_position_embeddings).astype(np.float32)


def _layer_plans(cfg: ModelConfig, i: int, key: str, has_imatrix: bool, types: dict) -> list[_Plan]:
    heads = {"q": cfg.num_heads, "k": cfg.num_kv_heads, "q_bias": cfg.num_heads, "k_bias": cfg.num_kv_heads}
    plans = []
    for role in names.layer_roles(cfg):
        name = f"layers.{i}.{role}"
        if role.startswith("experts."):
            _, e, proj = role.split(".")
            if e != "0":
                continue
            experts = tuple(f"layers.{i}.experts.{x}.{proj}" for x in range(cfg.moe.num_experts))
            shape = (len(experts), *names.tensor_shape(cfg, name))
            plans.append(_Plan(tensor_name(EXPERT_TENSORS[proj], i), shape,
                               tensor_type(cfg, name, key, has_imatrix), experts))
            continue
        suffix = "bias" if role.endswith("_bias") else "weight"
        plans.append(_Plan(tensor_name(LAYER_TENSORS[role], i, suffix), names.tensor_shape(cfg, name),
                           types.get(name) or tensor_type(cfg, name, key, has_imatrix), (name,), heads.get(role)))
    return plans


def _plans(cfg: ModelConfig, key: str, has_imatrix: bool, types: dict | None = None) -> list[_Plan]:
    def single(name: str) -> _Plan:
        return _Plan(tensor_name(GLOBAL_TENSORS[name]), names.tensor_shape(cfg, name),
                     tensor_type(cfg, name, key, has_imatrix), (name,))

    plans = []
    if cfg.rope_scaling and cfg.rope_scaling.rope_type == "llama3":
        factors = llama3_rope_factors(cfg)
        plans.append(_Plan(tensor_name(MT.ROPE_FREQS), factors.shape, T.F32, constant=factors))
    plans.append(single("embed"))
    for i in range(cfg.num_layers):
        plans += _layer_plans(cfg, i, key, has_imatrix, types or {})
    plans.append(single("norm"))
    if cfg.has_lm_head:
        plans.append(single("lm_head"))
    return plans


def tensor_count(cfg: ModelConfig, file_type: str) -> int:
    """How many GGUF tensors export_gguf writes (experts are stacked), e.g. for a progress bar."""
    return len(_plans(cfg, file_type_info(file_type)[0], has_imatrix=False))


# ---------------------------------------------------------------------------------------------------------
# Encoding one tensor


def _permuted(q, n_head: int):
    """A QTensor with its rows permuted like its weight (codes, scales and zeros are all per row)."""
    return type(q)(permute_qk(q.codes, n_head), permute_qk(q.scales, n_head), permute_qk(q.zeros, n_head),
                   q.bits, q.group_size)


def _encode(weights: Weights, name: str, plan: _Plan, importance: dict,
            packed: PackedBytes | None) -> tuple[np.ndarray, bool | None]:
    data = packed(name, plan.ggml_type) if packed else None
    if data is not None:
        return (permute_qk(data, plan.heads) if plan.heads else data), True
    quantized = weights.is_quantized(name)
    if quantized and plan.ggml_type in blocks.CARRIERS:
        q = weights.qtensor(name)
        if plan.heads:
            q = _permuted(q, plan.heads)
        data = blocks.carry(q, plan.ggml_type)
        if data is not None:
            return data, True
        w = q.dequantize()
    else:
        w = weights.get(name)
        if plan.heads:
            w = permute_qk(w, plan.heads)
    return blocks.encode(w, plan.ggml_type, importance.get(name), name), (False if quantized else None)


def _tensor_data(weights: Weights, plan: _Plan, importance: dict,
                 packed: PackedBytes | None) -> tuple[np.ndarray, bool | None]:
    if plan.constant is not None:
        return plan.constant, None
    if len(plan.sources) == 1:
        return _encode(weights, plan.sources[0], plan, importance, packed)
    out, carried = None, []
    for e, name in enumerate(plan.sources):  # filled in place: one expert's float copy at a time
        data, exact = _encode(weights, name, plan, importance, packed)
        if out is None:
            out = np.empty((len(plan.sources), *data.shape), data.dtype)
        out[e] = data
        carried.append(exact)
    return out, (None if all(c is None for c in carried) else all(bool(c) for c in carried))


# ---------------------------------------------------------------------------------------------------------
# Metadata


def _add_hyperparameters(w: gguf.GGUFWriter, cfg: ModelConfig, name: str, ftype: LlamaFileType) -> None:
    w.add_name(name)
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_layers)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.moe:
        w.add_expert_count(cfg.moe.num_experts)
        w.add_expert_used_count(cfg.moe.top_k)
        w.add_expert_feed_forward_length(cfg.moe.expert_intermediate_size)
    _add_rope_scaling(w, cfg)
    if cfg.embedding is not None:
        _add_encoder(w, cfg)


# Our own key: what llama.cpp's keys cannot say about an encoder (its query format, its Matryoshka sizes), so
# reading the GGUF back gives the same embedding config.
EMBEDDING_KEY = "kanana_quant.embedding"


def _add_encoder(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    """llama.cpp's embedding mode: bidirectional attention and mean pooling, read by its llama architecture.
    Its mean pools every token; leaving a query's instruction prefix out needs per-token outputs (pooling
    none) pooled by the caller, which our llama.cpp engine does."""
    emb = cfg.embedding
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_string(EMBEDDING_KEY, json.dumps({
        "architecture": cfg.architecture, "pooling": emb.pooling, "query_prefix": emb.query_prefix,
        "pool_instruction": emb.pool_instruction, "max_length": emb.max_length,
        "matryoshka_dimensions": list(emb.dimensions[:-1])}, ensure_ascii=False))


def _add_rope_scaling(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    s = cfg.rope_scaling
    if s is None or s.rope_type == "llama3":  # llama3 travels as the rope_freqs tensor
        return
    if s.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(s.factor)
        return
    # The beta keys are written although llama.cpp's llama architecture reads them from its context
    # parameters instead (see rope.llamacpp_yarn): they keep the file a complete description of the model.
    yarn = llamacpp_yarn(cfg)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(s.factor)
    w.add_rope_scaling_orig_ctx_len(yarn["yarn_orig_ctx"])
    w.add_rope_scaling_yarn_beta_fast(yarn["yarn_beta_fast"])
    w.add_rope_scaling_yarn_beta_slow(yarn["yarn_beta_slow"])
    if s.attention_factor is not None:  # otherwise llama.cpp derives 1 + 0.1·ln(factor) as HF does
        w.add_rope_scaling_yarn_attn_factor(yarn["yarn_attn_factor"])


# ---------------------------------------------------------------------------------------------------------
# Export


def _check_out_path(out: Path) -> None:
    if not out.parent.is_dir():
        raise KananaQuantError(f"{out}: folder {out.parent} does not exist; create it or choose another output")
    if out.is_dir():
        raise KananaQuantError(f"{out}: is a directory; pass a .gguf file path")


def _check_importance(cfg: ModelConfig, importance: dict) -> None:
    known = set(names.canonical_names(cfg))
    unknown = sorted(set(importance) - known)
    if unknown:
        raise KananaQuantError(f"importance names tensor {unknown[0]!r}, which this model does not have")


def _write(writer: gguf.GGUFWriter, weights: Weights, plans: list[_Plan], importance: dict,
           packed: PackedBytes | None, on_tensor: Callable[[TensorReport], None] | None) -> list[TensorReport]:
    reports = []
    for plan in plans:
        data, exact = _tensor_data(weights, plan, importance, packed)
        writer.write_tensor_data(np.ascontiguousarray(data))
        report = TensorReport(plan.gguf_name, plan.ggml_type.name, plan.shape, exact)
        reports.append(report)
        if on_tensor:
            on_tensor(report)
    return reports


def _log_summary(out: Path, reports: list[TensorReport]) -> None:
    quantized = [r for r in reports if r.exact is not None]
    if quantized:
        requantized = [r.name for r in quantized if not r.exact]
        log.info("%s: carried %d of %d quantized tensors exactly%s", out, len(quantized) - len(requantized),
                 len(quantized), f"; re-quantized {', '.join(requantized)}" if requantized else "")


def export_gguf(model: LoadedModel, out_path: str | Path, file_type: str,
                importance: dict[str, np.ndarray] | None = None,
                on_tensor: Callable[[TensorReport], None] | None = None, packed: PackedBytes | None = None,
                has_imatrix: bool | None = None, metadata: dict[str, str] | None = None,
                types: dict[str, GGMLQuantizationType] | None = None) -> Path:
    """Write `model` as a llama GGUF of `file_type` (see gguf.mix.FILE_TYPES); returns the path.

    importance: per canonical tensor name, [cols] mean squared activations, used by the importance-weighted
    searches of every type but Q8_0 (and, as in llama-quantize with an imatrix, it moves Q4_0/Q5_0's first
    ffn_down layers to Q4_1/Q5_1).
    on_tensor: called with a TensorReport after each tensor is written.
    packed: bytes a caller has already packed for some tensors (taken as they are, counted as exact).
    has_imatrix: pick the types llama-quantize picks with an importance matrix (default: whether `importance`
    is given); a calibrated caller that packs its own bytes sets it.
    metadata: extra string keys written into the header (e.g. the quantize report).
    types: per-tensor types that replace the mix's for those layer tensors (--target-bpw's choice).
    """
    key, _, ftype = file_type_info(file_type)
    out = Path(out_path)
    _check_out_path(out)
    cfg = model.config
    _check_expressible(cfg)
    importance = dict(importance or {})
    _check_importance(cfg, importance)
    writer = gguf.GGUFWriter(None, ARCH_NAME)
    source = Path(model.path)
    _add_hyperparameters(writer, cfg, source.name if source.is_dir() else source.stem, ftype)
    add_tokenizer(writer, model.tokenizer, cfg)
    for k, v in (metadata or {}).items():
        writer.add_string(k, v)
    plans = _plans(cfg, key, has_imatrix=bool(importance) if has_imatrix is None else has_imatrix, types=types)
    for plan in plans:
        writer.add_tensor_info(plan.gguf_name, plan.shape, np.dtype(np.float32), plan.nbytes,
                               raw_dtype=plan.ggml_type)
    with atomic_file(out) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            reports = _write(writer, model.weights, plans, importance, packed, on_tensor)
        finally:
            writer.close()
    _log_summary(out, reports)
    return out
