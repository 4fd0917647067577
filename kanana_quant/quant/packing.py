"""Pack integer codes into the GPTQ (v1) and AWQ "GEMM" checkpoint layouts, and unpack them again.

Our in-memory convention: codes uint8 [out, in], zeros / scales [out, n_groups], and
W[o, i] = scales[o, i // group_size] * (codes[o, i] - zeros[o, i // group_size]).

GPTQ v1 (AutoGPTQ ``qlinear_cuda_old.QuantLinear.pack``; what ``quant_method: gptq`` checkpoints hold):
  qweight int32 [in * bits / 32, out]   codes packed down the *input* axis;
  qzeros  int32 [n_groups, out * bits / 32]   (zero - 1) packed along the *output* axis;
  scales  fp16  [n_groups, out];  g_idx int32 [in] = i // group_size.
  Within a run of 32 values, value k occupies bits [bits*k, bits*k + bits) of a little-endian stream of
  `bits` consecutive int32 words. For 2/4/8 bits that never crosses a word; for 3 bits values 10 and 21
  straddle words 0/1 and 1/2, which is exactly AutoGPTQ's hand-unrolled 3-bit loop.
AWQ GEMM (AutoAWQ ``WQLinear_GEMM.from_linear``), 4-bit only:
  qweight int32 [in, out / 8] and qzeros int32 [n_groups, out / 8], both packed along the *output* axis,
  nibble i of a word holding output column 8c + AWQ_ORDER[i]; zeros stored as is; scales fp16
  [n_groups, out].
"""

from __future__ import annotations

from math import gcd

import numpy as np

from kanana_quant.errors import KananaQuantError

GPTQ_BITS = (2, 3, 4, 8)  # the widths a quantized checkpoint can store: every other module takes them from here
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PER_CHANNEL = -1  # group_size for one group per row


def group_width(group_size: int, in_features: int) -> int:
    """Columns per group: group_size, or the whole row for PER_CHANNEL."""
    return in_features if group_size == PER_CHANNEL else group_size


def packable(layout: str, bits: int, group_size: int, out_features: int, in_features: int) -> bool:
    """Whether a [out, in] linear can be stored in `layout` ("gptq" or "awq") at `bits` with this grouping:
    groups divide the row, GPTQ's input-axis words hold whole rows of codes, and zeros pack along the output
    axis (8 per word for AWQ, 32 / gcd(32, bits) values per run of words for GPTQ)."""
    if group_size != PER_CHANNEL and (group_size <= 0 or in_features % group_size):
        return False
    if layout == "awq":
        return out_features % 8 == 0
    return in_features * bits % 32 == 0 and out_features % (32 // gcd(32, bits)) == 0


# ---------------------------------------------------------------------------------------------------------
# Bit-stream helpers (the one place that knows how values sit in words)


def _run(bits: int) -> tuple[int, int]:
    """(values, words) of the shortest run that fills whole int32 words: 32/bits values in one word for
    2/4/8 bits, 32 values in 3 words for 3 bits."""
    values = 32 // gcd(32, bits)
    return values, values * bits // 32


def _pack_last(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of non-negative ints < 2^bits into uint32 words (length * bits / 32)."""
    n_vals, n_words = _run(bits)
    *lead, length = values.shape
    runs = values.reshape(*lead, length // n_vals, n_vals)
    words = np.zeros((*lead, length // n_vals, n_words), dtype=np.uint32)
    for k in range(n_vals):
        # Casting one value position at a time keeps peak memory at uint8-input + uint32-output size.
        v = runs[..., k].astype(np.uint32)
        w, shift = divmod(bits * k, 32)
        words[..., w] |= v << np.uint32(shift)
        if shift + bits > 32:  # straddles into the next word (3-bit values 10 and 21)
            words[..., w + 1] |= v >> np.uint32(32 - shift)
    return words.reshape(*lead, length // n_vals * n_words)


def _unpack_last(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of _pack_last: uint32 words on the last axis -> uint8 values (length * 32 / bits)."""
    n_vals, n_words = _run(bits)
    *lead, length = words.shape
    runs = words.reshape(*lead, length // n_words, n_words)
    mask = np.uint32((1 << bits) - 1)
    out = np.empty((*lead, length // n_words, n_vals), dtype=np.uint8)
    for k in range(n_vals):
        w, shift = divmod(bits * k, 32)
        v = runs[..., w] >> np.uint32(shift)
        if shift + bits > 32:
            v = v | (runs[..., w + 1] << np.uint32(32 - shift))
        out[..., k] = v & mask
    return out.reshape(*lead, length // n_words * n_vals)


def _as_words(a, name: str) -> np.ndarray:
    """Checkpoint int32 tensor -> uint32 view, so right shifts are logical rather than sign-extending."""
    a = np.asarray(a)
    if a.dtype not in (np.int32, np.uint32):
        raise KananaQuantError(f"packed tensor {name!r} has dtype {a.dtype}; expected int32")
    return a.view(np.uint32)


# ---------------------------------------------------------------------------------------------------------
# Input validation shared by both layouts


def _check_inputs(codes, zeros, scales, bits: int, group_size: int, fmt: str):
    codes = np.asarray(codes)
    zeros = np.asarray(zeros)
    scales = np.asarray(scales)
    if codes.ndim != 2:
        raise KananaQuantError(f"{fmt}: codes must be 2-D [out_features, in_features], got shape {codes.shape}")
    out_f, in_f = codes.shape
    group_size = group_width(group_size, in_f)
    if group_size <= 0:
        raise KananaQuantError(f"{fmt}: group_size must be positive or -1 (per-channel), got {group_size}")
    # vLLM and AutoAWQ size scales/zeros as in_features // group_size, so a ragged last group cannot load.
    if in_f % group_size:
        raise KananaQuantError(f"{fmt}: in_features {in_f} is not a multiple of group_size {group_size}")
    n_groups = in_f // group_size
    for name, a in (("zeros", zeros), ("scales", scales)):
        if a.shape != (out_f, n_groups):
            raise KananaQuantError(f"{fmt}: {name} has shape {a.shape}; expected ({out_f}, {n_groups}) "
                                   f"for codes {codes.shape} and group_size {group_size}")
    maxq = (1 << bits) - 1
    for name, a in (("codes", codes), ("zeros", zeros)):
        if not np.issubdtype(a.dtype, np.integer):
            raise KananaQuantError(f"{fmt}: {name} must be an integer array, got dtype {a.dtype}")
        if a.size and (a.min() < 0 or a.max() > maxq):
            raise KananaQuantError(f"{fmt}: {name} values must lie in [0, {maxq}] for {bits}-bit, "
                                   f"found [{a.min()}, {a.max()}]")
    with np.errstate(over="ignore"):
        scales16 = scales.astype(np.float16)
    if not np.all(np.isfinite(scales16)):
        raise KananaQuantError(f"{fmt}: scales contain values that are not finite in float16 "
                               f"(|scale| must stay below 65504)")
    return codes, zeros, scales16, group_size, n_groups


def _check_multiple(n: int, k: int, what: str, fmt: str, why: str):
    if n % k:
        raise KananaQuantError(f"{fmt}: {what} {n} is not a multiple of {k} ({why})")


# ---------------------------------------------------------------------------------------------------------
# GPTQ v1


def _check_gptq_bits(bits: int):
    if bits not in GPTQ_BITS:
        raise KananaQuantError(f"GPTQ packing supports bits {GPTQ_BITS}, got {bits}")


def pack_gptq(codes, zeros, scales, bits: int, group_size: int) -> dict[str, np.ndarray]:
    """Pack codes/zeros/scales into AutoGPTQ v1 tensors: qweight, qzeros, scales, g_idx.

    Zero points are stored as (zero - 1) because every v1 reader (AutoGPTQ, vLLM's gptq kernels,
    exllama) adds 1 back after masking. A zero point of 0 therefore has no v1 encoding: its field would
    read back as 2^bits (vLLM/AutoGPTQ) or 0 (recent GPTQModel), depending on the loader, so it is refused
    rather than written ambiguously.
    """
    _check_gptq_bits(bits)
    codes, zeros, scales16, group_size, n_groups = _check_inputs(codes, zeros, scales, bits, group_size, "GPTQ")
    out_f, in_f = codes.shape
    n_vals, _ = _run(bits)
    _check_multiple(in_f, n_vals, "in_features", f"GPTQ {bits}-bit",
                    f"qweight packs {n_vals} input rows per {bits * n_vals // 32} int32 word(s)")
    _check_multiple(out_f, n_vals, "out_features", f"GPTQ {bits}-bit",
                    f"qzeros packs {n_vals} output columns per {bits * n_vals // 32} int32 word(s)")
    if zeros.size and zeros.min() == 0:
        n_bad = int(np.count_nonzero(zeros == 0))
        raise KananaQuantError(f"GPTQ v1 stores zero - 1, so zero point 0 ({n_bad} group(s)) cannot be "
                               f"written; loaders would read it as {1 << bits}: clamp zeros to >= 1 or use sym")

    # Packing down the input axis of codes.T == packing the last axis of codes, then transposing.
    qweight = np.ascontiguousarray(_pack_last(codes, bits).T)
    # Transpose first so the output axis is last: qzeros is [n_groups, packed out].
    qzeros = _pack_last(np.ascontiguousarray(zeros.T).astype(np.uint8) - np.uint8(1), bits)
    return {
        "qweight": qweight.view(np.int32),
        "qzeros": qzeros.view(np.int32),
        "scales": np.ascontiguousarray(scales16.T),
        "g_idx": (np.arange(in_f, dtype=np.int32) // np.int32(group_size)).astype(np.int32),
    }


def _packed_tensors(tensors: dict, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """qweight, qzeros (as int32 words) and scales, each present and 2-D."""
    for key in ("qweight", "qzeros", "scales"):
        if key not in tensors:
            raise KananaQuantError(f"{fmt} tensors are missing {key!r} (have {sorted(tensors)})")
    qweight = _as_words(tensors["qweight"], "qweight")
    qzeros = _as_words(tensors["qzeros"], "qzeros")
    scales = np.asarray(tensors["scales"])
    if qweight.ndim != 2 or qzeros.ndim != 2 or scales.ndim != 2:
        raise KananaQuantError(f"{fmt} tensors must be 2-D; got qweight {qweight.shape}, qzeros {qzeros.shape}, "
                               f"scales {scales.shape}")
    return qweight, qzeros, scales


def unpack_gptq(tensors: dict, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of pack_gptq: (codes uint8 [out, in], zeros int32 [out, n_groups], scales float32).

    Zeros are decoded the way AutoGPTQ and vLLM decode v1: (field & mask) + 1, so a foreign checkpoint's
    all-ones field comes back as 2^bits rather than being silently wrapped to 0.
    """
    _check_gptq_bits(bits)
    qweight, qzeros, scales = _packed_tensors(tensors, "GPTQ")
    _, n_words = _run(bits)
    if qweight.shape[0] % n_words or qzeros.shape[1] % n_words:
        raise KananaQuantError(f"GPTQ {bits}-bit: qweight rows {qweight.shape[0]} and qzeros columns "
                               f"{qzeros.shape[1]} must be multiples of {n_words}")
    in_f = qweight.shape[0] * 32 // bits
    out_f = qweight.shape[1]
    gs = group_width(group_size, in_f)
    if gs <= 0 or in_f % gs:
        raise KananaQuantError(f"GPTQ: in_features {in_f} (from qweight {qweight.shape}) is not a multiple of "
                               f"group_size {group_size}")
    n_groups = in_f // gs
    if scales.shape != (n_groups, out_f) or qzeros.shape != (n_groups, out_f * bits // 32):
        raise KananaQuantError(f"GPTQ {bits}-bit: scales {scales.shape} / qzeros {qzeros.shape} do not match "
                               f"qweight {qweight.shape} with group_size {group_size}; expected "
                               f"({n_groups}, {out_f}) / ({n_groups}, {out_f * bits // 32})")
    if "g_idx" in tensors:
        g_idx = np.asarray(tensors["g_idx"])
        # Act-order checkpoints permute g_idx; our convention (g = i // group_size) cannot express that.
        if not np.array_equal(g_idx, np.arange(in_f) // gs):
            raise KananaQuantError("GPTQ g_idx is not i // group_size (act-order / desc_act checkpoint?); "
                                   "only sequential groups are supported")

    codes = np.ascontiguousarray(_unpack_last(np.ascontiguousarray(qweight.T), bits))
    zeros = np.ascontiguousarray(_unpack_last(qzeros, bits).T).astype(np.int32) + 1
    return codes, zeros, np.ascontiguousarray(scales.T).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# AWQ GEMM


def output_rows(layout: str, tensors: dict, bits: int, start: int, stop: int) -> dict:
    """Output rows start:stop of a packed linear's tensors ("gptq" or "awq" layout), still packed. scales
    hold one column per output row; GPTQ's qweight one column per row and its qzeros `bits` bits per row; AWQ
    packs 8 rows per int32 column in both. `start` must be a multiple of 32, the longest packed run (3-bit:
    32 values in 3 words), so every word of the block belongs to it alone."""
    if start % 32:
        raise ValueError(f"a block of output rows must start at a multiple of 32, not {start}")
    row_bits = 4 if layout == "awq" else bits  # bits per output row in a packed int32 column
    out = {}
    for key, packed in tensors.items():
        if key == "g_idx":  # one entry per input feature
            out[key] = packed
        elif key == "scales" or (key == "qweight" and layout != "awq"):
            out[key] = packed[:, start:stop]
        else:
            out[key] = packed[:, start * row_bits // 32:-(-stop * row_bits // 32)]
    return out


def _check_awq_bits(bits: int):
    if bits != 4:
        raise KananaQuantError(f"AWQ GEMM packing supports only 4-bit, got {bits}")


def _pack_awq_cols(values: np.ndarray) -> np.ndarray:
    """[rows, out] 4-bit values -> [rows, out/8] words; nibble i holds column 8c + AWQ_ORDER[i]."""
    rows, out_f = values.shape
    runs = values.reshape(rows, out_f // 8, 8)
    words = np.zeros((rows, out_f // 8), dtype=np.uint32)
    # Shifting each interleaved column straight into place avoids materialising a permuted copy.
    for i, col in enumerate(AWQ_ORDER):
        words |= runs[:, :, col].astype(np.uint32) << np.uint32(4 * i)
    return words


def _unpack_awq_cols(words: np.ndarray) -> np.ndarray:
    rows, n_words = words.shape
    out = np.empty((rows, n_words, 8), dtype=np.uint8)
    for i, col in enumerate(AWQ_ORDER):
        out[:, :, col] = (words >> np.uint32(4 * i)) & np.uint32(0xF)
    return out.reshape(rows, n_words * 8)


def pack_awq(codes, zeros, scales, group_size: int, bits: int = 4) -> dict[str, np.ndarray]:
    """Pack codes/zeros/scales into AutoAWQ GEMM tensors: qweight, qzeros, scales (zeros stored as is)."""
    _check_awq_bits(bits)
    codes, zeros, scales16, group_size, n_groups = _check_inputs(codes, zeros, scales, 4, group_size, "AWQ")
    out_f, _ = codes.shape
    _check_multiple(out_f, 8, "out_features", "AWQ", "qweight/qzeros pack 8 output columns per int32 word")
    # AWQ's qweight is [in, out/8]: transpose so rows are input features, then pack along output.
    qweight = _pack_awq_cols(np.ascontiguousarray(codes.T))
    qzeros = _pack_awq_cols(np.ascontiguousarray(zeros.T).astype(np.uint8))
    return {
        "qweight": qweight.view(np.int32),
        "qzeros": qzeros.view(np.int32),
        "scales": np.ascontiguousarray(scales16.T),
    }


def unpack_awq(tensors: dict, group_size: int, bits: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of pack_awq: (codes uint8 [out, in], zeros int32 [out, n_groups], scales float32)."""
    _check_awq_bits(bits)
    qweight, qzeros, scales = _packed_tensors(tensors, "AWQ")
    in_f, out_f = qweight.shape[0], qweight.shape[1] * 8
    gs = group_width(group_size, in_f)
    if gs <= 0 or in_f % gs:
        raise KananaQuantError(f"AWQ: in_features {in_f} (from qweight {qweight.shape}) is not a multiple of "
                               f"group_size {group_size}")
    n_groups = in_f // gs
    if scales.shape != (n_groups, out_f) or qzeros.shape != (n_groups, out_f // 8):
        raise KananaQuantError(f"AWQ: scales {scales.shape} / qzeros {qzeros.shape} do not match qweight "
                               f"{qweight.shape} with group_size {group_size}; expected ({n_groups}, {out_f}) "
                               f"/ ({n_groups}, {out_f // 8})")
    codes = np.ascontiguousarray(_unpack_awq_cols(qweight).T)
    zeros = np.ascontiguousarray(_unpack_awq_cols(qzeros).T).astype(np.int32)
    return codes, zeros, np.ascontiguousarray(scales.T).astype(np.float32)
