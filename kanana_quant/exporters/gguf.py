"""GGUF export: a loaded model (HF float, GGUF, or our quantized checkpoint) written as a llama.cpp `llama` file.

The file is what convert_hf_to_gguf.py followed by llama-quantize would produce: the converter's metadata,
tensor names (from gguf-py's tables), Q/K row permutation, stacked MoE experts and tokenizer keys, and
llama-quantize's per-role type mix (`tensor_type`). Tensors are read, encoded and written one at a time.

Quantized checkpoints are carried over without re-rounding wherever a GGML type holds their grid exactly:
W = s·(q − z) per group of ≥ 32 columns becomes, per 32-block, d = s and the offsets q − z stored as
Q4_0 (offsets in [−8, 7]), Q5_0 ([−16, 15]), Q8_0 ([−128, 127]) or Q4_1 (q with m = −s·z when fp16 holds
it). Everything else is dequantized and quantized to the tensor's type like a float model.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import MODEL_TENSOR as MT
from tokenizers import Regex, pre_tokenizers

from kanana_quant import kanana, names
from kanana_quant.atomic import atomic_file
from kanana_quant.config import ModelConfig
from kanana_quant.errors import KananaQuantError
from kanana_quant.exporters import ggml_blocks
from kanana_quant.gguf_reader import PRE_TOKENIZER_SPLITS
from kanana_quant.rope import llamacpp_yarn

log = logging.getLogger(__name__)

T = GGMLQuantizationType
ARCH = gguf.MODEL_ARCH.LLAMA
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]

# name -> (default tensor type, llama.cpp's general.file_type)
FILE_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "F32": (T.F32, LlamaFileType.ALL_F32),
    "F16": (T.F16, LlamaFileType.MOSTLY_F16),
    "BF16": (T.BF16, LlamaFileType.MOSTLY_BF16),
    "Q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "Q4_1": (T.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "Q5_0": (T.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "Q4_K_M": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "Q5_K_M": (T.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "Q6_K": (T.Q6_K, LlamaFileType.MOSTLY_Q6_K),
}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
K_TYPES = (T.Q4_K, T.Q5_K, T.Q6_K)
# llama-quantize's tensor_type_fallback for rows that are not whole 256-blocks.
K_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
CARRIERS = (T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_1)
_CARRIER_BLOCK = 32

GLOBAL_TENSORS = {"embed": MT.TOKEN_EMBD, "norm": MT.OUTPUT_NORM, "lm_head": MT.OUTPUT}
LAYER_TENSORS = {
    "attn_norm": MT.ATTN_NORM, "q": MT.ATTN_Q, "k": MT.ATTN_K, "v": MT.ATTN_V, "o": MT.ATTN_OUT,
    "q_bias": MT.ATTN_Q, "k_bias": MT.ATTN_K, "v_bias": MT.ATTN_V,
    "ffn_norm": MT.FFN_NORM, "gate": MT.FFN_GATE, "up": MT.FFN_UP, "down": MT.FFN_DOWN,
    "router": MT.FFN_GATE_INP,
}
EXPERT_TENSORS = {"gate": MT.FFN_GATE_EXP, "up": MT.FFN_UP_EXP, "down": MT.FFN_DOWN_EXP}
_UNUSED_TOKEN = re.compile(r"<\|kq_unused_\d+\|>")
# llama.cpp's own pre-tokenizer fingerprint text (convert_hf_to_gguf.py chktxt), plus Korean.
_PRE_PROBE = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
              "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
              "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
              "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL 카카오의 카나나는 123,456원!\r\n")
_PRE_CANDIDATES = ("llama-bpe", "smollm", "gpt2", "qwen2")


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
# File types and the per-tensor mix


def file_type_info(file_type: str) -> tuple[str, GGMLQuantizationType, LlamaFileType]:
    key = str(file_type).upper()
    if key not in FILE_TYPES:
        raise KananaQuantError(f"unknown GGUF type {file_type!r}; choose one of: {', '.join(FILE_TYPES)}")
    return (key, *FILE_TYPES[key])


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quantize's choice of layers that get more bits: the first and last eighth, and every third."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _role(name: str) -> tuple[str, int | None]:
    if not name.startswith("layers."):
        return name, None
    _, layer, role = name.split(".", 2)
    return role.rsplit(".", 1)[-1] if role.startswith("experts.") else role, int(layer)


def _mix(cfg: ModelConfig, name: str, key: str, default: GGMLQuantizationType, cols: int,
         has_imatrix: bool) -> GGMLQuantizationType:
    """llama_tensor_get_type_impl for the roles a llama model has and the file types we write."""
    role, layer = _role(name)
    n, experts = cfg.num_layers, cfg.moe.num_experts if cfg.moe else 0
    if role == "lm_head" or (role == "embed" and cfg.tie_word_embeddings):
        # the output matrix decides quality at every step, so it gets 6 bits whatever the mix
        if cols % GGML_QUANT_SIZES[default][0]:
            return T.Q8_0
        return default if default == T.Q8_0 else T.Q6_K
    if role == "v":
        chosen = T.Q6_K if key in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n) else default
        return T.Q8_0 if experts == 8 else chosen  # Mixtral-8x: V (and K) are tiny next to the experts
    if role == "k" and experts == 8:
        return T.Q8_0
    if role == "down":
        if key in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n):
            return T.Q6_K
        if key in ("Q4_0", "Q5_0") and has_imatrix and layer < n // 8:
            return T.Q4_1 if key == "Q4_0" else T.Q5_1
    if role == "o" and experts == 8 and key == "Q4_K_M":
        return T.Q5_K
    return default


def _fallback(qtype: GGMLQuantizationType, cols: int) -> GGMLQuantizationType:
    """llama-quantize's tensor_type_fallback; where it would abort (legacy types on rows that are not whole
    32-blocks) we store F16, its own last resort."""
    if cols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = K_FALLBACK.get(qtype, T.F16)
    return qtype if cols % GGML_QUANT_SIZES[qtype][0] == 0 else T.F16


def tensor_type(cfg: ModelConfig, name: str, file_type: str, has_imatrix: bool = False) -> GGMLQuantizationType:
    """The GGML type llama-quantize gives a canonical tensor (expert names give their stacked tensor's type)."""
    key, default, _ = file_type_info(file_type)
    shape = names.tensor_shape(cfg, name)
    if len(shape) < 2 or _role(name)[0] == "router":
        return T.F32  # norms, biases and the router stay exact: tiny, and the router picks experts
    if default in FLOAT_TYPES:
        return default
    return _fallback(_mix(cfg, name, key, default, shape[-1], has_imatrix), shape[-1])


def carrier_file_type(fmt) -> str | None:
    """The file type whose main tensor type holds a QuantFormat's codes exactly (for row widths that are
    whole 32-blocks and groups of 32, 64, 128 or per-channel), or None."""
    if fmt.bits <= 4:
        return "Q4_0" if fmt.sym else "Q5_0"
    return "Q8_0" if fmt.bits == 8 and fmt.sym else None


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


def _tensor_name(kind: MT, bid: int | None = None, suffix: str = "weight") -> str:
    if kind not in gguf.MODEL_TENSORS[ARCH]:
        raise KananaQuantError(f"the llama GGUF architecture has no {kind.name} tensor")
    return f"{gguf.TENSOR_NAMES[kind].format(bid=bid)}.{suffix}"


# ---------------------------------------------------------------------------------------------------------
# The tensor plan


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
    """The converter's rope_freqs: per rotary frequency, the divisor Llama-3 RoPE scaling applies."""
    s, dim = cfg.rope_scaling, cfg.head_dim
    freqs = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    wavelen = 2 * math.pi / freqs.astype(np.float64)
    old = s.original_max_position_embeddings
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = 1 / ((1 - smooth) / s.factor + smooth)
    factors = np.where(wavelen < old / s.high_freq_factor, 1.0,
                       np.where(wavelen > old / s.low_freq_factor, s.factor, blended))
    return factors.astype(np.float32)


def _layer_plans(cfg: ModelConfig, i: int, key: str, has_imatrix: bool) -> list[_Plan]:
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
            plans.append(_Plan(_tensor_name(EXPERT_TENSORS[proj], i), shape,
                               tensor_type(cfg, name, key, has_imatrix), experts))
            continue
        suffix = "bias" if role.endswith("_bias") else "weight"
        plans.append(_Plan(_tensor_name(LAYER_TENSORS[role], i, suffix), names.tensor_shape(cfg, name),
                           tensor_type(cfg, name, key, has_imatrix), (name,), heads.get(role)))
    return plans


def _plans(cfg: ModelConfig, key: str, has_imatrix: bool) -> list[_Plan]:
    def single(name: str) -> _Plan:
        return _Plan(_tensor_name(GLOBAL_TENSORS[name]), names.tensor_shape(cfg, name),
                     tensor_type(cfg, name, key, has_imatrix), (name,))

    plans = []
    if cfg.rope_scaling and cfg.rope_scaling.rope_type == "llama3":
        factors = llama3_rope_factors(cfg)
        plans.append(_Plan(_tensor_name(MT.ROPE_FREQS), factors.shape, T.F32, constant=factors))
    plans.append(single("embed"))
    for i in range(cfg.num_layers):
        plans += _layer_plans(cfg, i, key, has_imatrix)
    plans.append(single("norm"))
    if not cfg.tie_word_embeddings:
        plans.append(single("lm_head"))
    return plans


def tensor_count(cfg: ModelConfig, file_type: str) -> int:
    """How many GGUF tensors export_gguf writes (experts are stacked), e.g. for a progress bar."""
    return len(_plans(cfg, file_type_info(file_type)[0], has_imatrix=False))


# ---------------------------------------------------------------------------------------------------------
# Encoding one tensor


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: per head, interleave the two rotary halves (llama.cpp
    rotates adjacent pairs, Hugging Face rotates half against half). Inverse of gguf_reader.unpermute_rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permuted(q, n_head: int):
    """A QTensor with its rows permuted like its weight (codes, scales and zeros are all per row)."""
    return type(q)(permute_rows(q.codes, n_head), permute_rows(q.scales, n_head), permute_rows(q.zeros, n_head),
                   q.bits, q.group_size)


def _q8_0_full_range(offsets: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q8_0 bytes with −128 allowed: symmetric 8-bit grids that put the extreme weight on the lowest level
    need it; ggml's int8 storage and dot products take it (llama.cpp's own rounding just never emits it)."""
    rows, cols = offsets.shape
    d = scales.astype("<f2").reshape(rows, cols // _CARRIER_BLOCK, 1).view(np.uint8)
    q = offsets.astype(np.int8).reshape(rows, cols // _CARRIER_BLOCK, _CARRIER_BLOCK).view(np.uint8)
    return np.concatenate([d, q], axis=-1).reshape(rows, -1)


def _carry(q, qtype: GGMLQuantizationType) -> np.ndarray | None:
    """qtype bytes that dequantize to exactly q's weights, or None when qtype cannot hold them."""
    width = q.group_width()
    if width % _CARRIER_BLOCK or q.codes.shape[1] % _CARRIER_BLOCK:
        return None
    per_block = width // _CARRIER_BLOCK
    scales = np.repeat(q.scales, per_block, axis=1)
    zeros = np.repeat(q.zeros.astype(np.int16), per_block, axis=1)
    offsets = q.codes.astype(np.int16) - np.repeat(zeros, _CARRIER_BLOCK, axis=1)
    lo, hi = int(offsets.min()), int(offsets.max())
    try:
        if qtype == T.Q4_0 and -8 <= lo and hi <= 7:
            return ggml_blocks.pack_q4_0(offsets + 8, scales)
        if qtype == T.Q5_0 and -16 <= lo and hi <= 15:
            return ggml_blocks.pack_q5_0(offsets + 16, scales)
        if qtype == T.Q8_0 and -127 <= lo and hi <= 127:
            return ggml_blocks.pack_q8_0(offsets, scales)
        if qtype == T.Q8_0 and -128 <= lo and hi <= 127 and _fp16_exact(scales):
            return _q8_0_full_range(offsets, scales)
        if qtype == T.Q4_1 and q.bits <= 4:
            return ggml_blocks.pack_q4_1(q.codes, scales, -scales.astype(np.float64) * zeros)
    except ValueError:  # a scale or Q4_1 minimum that fp16 cannot hold: not exact, so not carried
        return None
    return None


def _fp16_exact(x: np.ndarray) -> bool:
    h = x.astype(np.float16)
    return bool(np.isfinite(h).all() and np.array_equal(h.astype(np.float64), x.astype(np.float64)))


def _quantize(w: np.ndarray, qtype: GGMLQuantizationType, importance: np.ndarray | None, name: str) -> np.ndarray:
    if qtype in (T.F32, T.F16, T.BF16, T.Q5_1):  # gguf-py's own encoders (Q5_1: the Q5_K row fallback)
        return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)
    try:
        return ggml_blocks.quantize(w, qtype, importance if qtype in K_TYPES else None)
    except ValueError as e:
        raise KananaQuantError(f"{name}: cannot encode as {qtype.name} ({e})") from None


def _is_quantized(weights, name: str) -> bool:
    return bool(getattr(weights, "is_quantized", lambda _: False)(name))


def _encode(weights, name: str, plan: _Plan, importance: dict) -> tuple[np.ndarray, bool | None]:
    packed = getattr(weights, "ggml_bytes", None)  # GPTQ run on this type's grid (quant/gguf_stream.py)
    if packed is not None:
        data = packed(name, plan.ggml_type, plan.heads)
        if data is not None:
            return data, True
    quantized = _is_quantized(weights, name)
    if quantized and plan.ggml_type in CARRIERS:
        q = weights.qtensor(name)
        if plan.heads:
            q = _permuted(q, plan.heads)
        data = _carry(q, plan.ggml_type)
        if data is not None:
            return data, True
        w = q.dequantize()
    else:
        w = weights.get(name)
        if plan.heads:
            w = permute_rows(w, plan.heads)
    return _quantize(w, plan.ggml_type, importance.get(name), name), (False if quantized else None)


def _tensor_data(weights, plan: _Plan, importance: dict) -> tuple[np.ndarray, bool | None]:
    if plan.constant is not None:
        return plan.constant, None
    if len(plan.sources) == 1:
        return _encode(weights, plan.sources[0], plan, importance)
    out, carried = None, []
    for e, name in enumerate(plan.sources):  # filled in place: one expert's float copy at a time
        data, exact = _encode(weights, name, plan, importance)
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


def _pre_tokenizer_name(tok, where: str) -> str:
    """tokenizer.ggml.pre by behaviour, as llama.cpp fingerprints tokenizers: the candidate whose splits
    cut the probe text exactly as this tokenizer's pre-tokenizer does."""
    ours = tok.pre_tokenizer
    if ours is None or tok.normalizer is not None:
        raise KananaQuantError(f"{where}: tokenizer has {'no pre-tokenizer' if ours is None else 'a normalizer'}; "
                               "GGUF export supports byte-level BPE tokenizers like Llama-3's")
    pieces = [p for p, _ in ours.pre_tokenize_str(_PRE_PROBE)]
    for pre in _PRE_CANDIDATES:
        candidate = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in PRE_TOKENIZER_SPLITS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
        if [p for p, _ in candidate.pre_tokenize_str(_PRE_PROBE)] == pieces:
            return pre
    raise KananaQuantError(f"{where}: pre-tokenizer matches none of llama.cpp's {', '.join(_PRE_CANDIDATES)}; "
                           "its GGUF would tokenize differently")


def _vocab(tok, vocab_size: int, where: str) -> tuple[list[str], list[int]]:
    """Tokens by id with llama.cpp token types; ids the tokenizer lacks are [PAD{i}] as the converter writes."""
    added = tok.get_added_tokens_decoder()
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, i in tok.get_vocab(with_added_tokens=True).items():
        if i >= vocab_size:
            raise KananaQuantError(f"{where}: token {text!r} has id {i}, beyond the model's {vocab_size} embeddings")
        tokens[i] = text
        if i in added:
            types[i] = int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif _UNUSED_TOKEN.fullmatch(text):
            types[i] = int(gguf.TokenType.UNUSED)
        else:
            types[i] = int(gguf.TokenType.NORMAL)
    return tokens, types


def _merges(tok, where: str) -> list[str]:
    model = json.loads(tok.to_str()).get("model", {})
    if model.get("type") != "BPE":
        raise KananaQuantError(f"{where}: tokenizer model is {model.get('type')!r}; GGUF export writes byte-level "
                               "BPE ('gpt2') tokenizers")
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _add_tokenizer(w: gguf.GGUFWriter, tokenizer, cfg: ModelConfig) -> None:
    tok, where = tokenizer._tok, tokenizer.source
    pre = _pre_tokenizer_name(tok, where)
    tokens, types = _vocab(tok, cfg.vocab_size, where)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_merges(tok, where))
    bos = tokenizer.bos_id
    eos = tokenizer.token_id(tokenizer.eos_token)
    if eos is None and cfg.eos_token_ids:
        eos = cfg.eos_token_ids[0]
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    for add, special in ((w.add_eot_token_id, kanana.EOT_TOKEN), (w.add_eom_token_id, kanana.EOM_TOKEN)):
        if (i := tokenizer.token_id(special)) is not None:
            add(i)
    probe = tok.encode("a", add_special_tokens=True).ids
    w.add_add_bos_token(bos is not None and probe[:1] == [bos])
    w.add_add_eos_token(eos is not None and probe[-1:] == [eos])
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


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


def _write(writer: gguf.GGUFWriter, weights, plans: list[_Plan], importance: dict,
           on_tensor: Callable[[TensorReport], None] | None) -> list[TensorReport]:
    reports = []
    for plan in plans:
        data, exact = _tensor_data(weights, plan, importance)
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


def export_gguf(model, out_path: str | Path, file_type: str, importance: dict[str, np.ndarray] | None = None,
                on_tensor: Callable[[TensorReport], None] | None = None) -> Path:
    """Write `model` (a LoadedModel) as a llama GGUF of `file_type` (see FILE_TYPES); returns the path.

    importance: per canonical tensor name, [cols] mean squared activations, used by the K-quant searches
    (and, as in llama-quantize with an imatrix, it moves Q4_0/Q5_0's first ffn_down layers to Q4_1/Q5_1).
    on_tensor: called with a TensorReport after each tensor is written.
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
    _add_tokenizer(writer, model.tokenizer, cfg)
    plans = _plans(cfg, key, has_imatrix=bool(importance))
    for plan in plans:
        writer.add_tensor_info(plan.gguf_name, plan.shape, np.dtype(np.float32), plan.nbytes,
                               raw_dtype=plan.ggml_type)
    with atomic_file(out) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            reports = _write(writer, model.weights, plans, importance, on_tensor)
        finally:
            writer.close()
    _log_summary(out, reports)
    return out
