"""Numpy packers for llama.cpp's GGML block types: the bytes of a GGUF tensor, exactly as ggml stores them.

Every quantizer takes a float32 tensor [rows, cols] (cols a multiple of the type's block size) and returns
uint8 [rows, cols // block * type_size], so ``gguf.quants.dequantize(out, type)`` gives [rows, cols] back.
gguf-py dequantizes every type but quantizes only a few, hence this module.

Layouts per block (ggml-common.h):
  Q8_0  fp16 d | int8 q[32]                                           w = d·q
  Q4_0  fp16 d | 16 B nibbles (low = element j, high = element j + 16)  w = d·(q − 8)
  Q4_1  fp16 d | fp16 m | 16 B nibbles                                 w = d·q + m
  Q5_0  fp16 d | u32 fifth bits (bit j = element j) | 16 B nibbles     w = d·(q − 16)
  Q4_K  fp16 d | fp16 dmin | 12 B six-bit sc, m | 128 B nibbles        w = d·sc·q − dmin·m per 32
        (nibbles per 64 weights: low = first 32, high = next 32)
  Q5_K  as Q4_K with 32 B of fifth bits before the nibbles (bit s of byte l = sub-block s, element l)
  Q6_K  128 B low nibbles | 64 B high 2-bit pairs | int8 sc[16] | fp16 d   w = d·sc·(q − 32) per 16

Q8_0/Q4_0/Q4_1/Q5_0 reproduce llama.cpp's ``quantize_row_*_ref`` bit for bit (and gguf-py's quantizer).
The K-quants run llama.cpp's searches: make_qkx2_quants for Q4_K/Q5_K and make_qx_quants for Q6_K, or with
an importance matrix make_qkx3_quants + make_qp_quants (weighted make_qx_quants for Q6_K), with the same
candidates, tie rules and left-to-right float32 sums. They matched a plain C build of those functions byte
for byte on the tensors tried; a build that fuses multiply-adds (-march=native) can differ on near-ties.

``pack_q4_0`` / ``pack_q5_0`` / ``pack_q8_0`` / ``pack_q4_1`` carry already-quantized codes exactly, and
``carry`` finds the carrier bytes of a whole quantized tensor (GPTQ/AWQ/RTN codes W = s·(q − z) per group of
≥ 32 columns become, per 32-block, d = s and the offsets q − z in Q4_0, Q5_0 or Q8_0, or q with m = −s·z in
Q4_1); ``fit_q*_k`` / ``pack_q*_k`` expose the K-quant fields so other code can fill the K grids itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

from kanana_quant.errors import KananaQuantError

if TYPE_CHECKING:
    from kanana_quant.qcheckpoint import QTensor

T = GGMLQuantizationType
SUPPORTED = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL,
             T.IQ4_XS)
BLOCK_SIZES = {t: GGML_QUANT_SIZES[t][0] for t in SUPPORTED}
TYPE_SIZES = {t: GGML_QUANT_SIZES[t][1] for t in SUPPORTED}

_F32 = np.float32
_GROUP_MAX_EPS = _F32(1e-15)  # ggml treats a group whose largest magnitude is below this as all zero
_SUB_K = 32  # Q4_K/Q5_K sub-block: eight per super-block, each with a 6-bit scale and min
_SUB_Q6 = 16  # Q6_K sub-block: sixteen per super-block, each with an int8 scale
_SUB_16 = 16  # Q2_K/Q3_K sub-block: sixteen per super-block, each with a 4-bit (Q2_K) or 6-bit (Q3_K) scale
_SUB_IQ4 = 32  # IQ4_NL block and IQ4_XS sub-block
_CHUNK_WEIGHTS = 1 << 20  # bounds the float temporaries of the K-quant searches


# ---------------------------------------------------------------------------------------------------------
# Shapes, bytes, rounding


def _blocks(w, qtype: T, dtype=np.float32, name: str = "tensor") -> np.ndarray:
    """[rows, n_blocks, block] view of a [rows, cols] array."""
    a = np.asarray(w, dtype=dtype)
    if a.ndim != 2:
        raise ValueError(f"{qtype.name}: {name} must be 2-D [rows, cols], got shape {a.shape}")
    block = BLOCK_SIZES[qtype]
    if a.shape[1] % block:
        raise ValueError(f"{qtype.name}: {name} has {a.shape[1]} columns, not a multiple of {block}")
    return a.reshape(a.shape[0], -1, block)


def _rows(parts: list[np.ndarray], qtype: T) -> np.ndarray:
    """Per-block fields concatenated in storage order, flattened to [rows, n_blocks * type_size]."""
    out = np.concatenate([p.astype(np.uint8, copy=False) for p in parts], axis=-1)
    assert out.shape[-1] == TYPE_SIZES[qtype], (qtype.name, out.shape)
    return out.reshape(out.shape[0], -1)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """Little-endian fp16 bytes, [..., 2]; numpy's cast rounds to nearest even like GGML_FP32_TO_FP16."""
    with np.errstate(over="ignore"):  # fp16 overflow gives inf, as ggml's conversion does
        h = np.ascontiguousarray(np.asarray(x).astype("<f2"))
    return h.reshape(*h.shape, 1).view(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Element j in the low nibble and element j + n/2 in the high one (the high bits above 4 drop out)."""
    half = q.shape[-1] // 2
    return (q[..., :half] & 0xF) | (q[..., half:] << 4)


def _bit_plane(q: np.ndarray, bit: int, axis: int = -1) -> np.ndarray:
    """Bit `bit` of each code, packed along `axis` as a little-endian bit string."""
    return np.packbits((q >> bit) & 1, axis=axis, bitorder="little")


def _roundf(x: np.ndarray) -> np.ndarray:
    """C roundf (halves away from zero); exact, unlike floor(|x| + 0.5) in float32."""
    a = np.abs(x)
    f = np.floor(a)
    return np.copysign(f + (a - f >= 0.5), x)


def _nearest(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """ggml's nearest_int (its 1.5·2^23 trick rounds halves to even, as rint does), then clamped."""
    return np.clip(np.rint(x), lo, hi)


def _inv(d: np.ndarray) -> np.ndarray:
    """ggml's `d ? 1.0f/d : 0.0f`."""
    nz = d != 0
    return np.where(nz, _F32(1) / np.where(nz, d, _F32(1)), _F32(0))


def _safe(x: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """x where ok, else 1: a divisor that raises no warnings on the lanes we throw away."""
    return np.where(ok, x, _F32(1))


def _sum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis left to right, as ggml's loops do: numpy's pairwise sum rounds differently
    and flips near-ties between candidate grids. (One add per column: half the time of cumsum, same order.)"""
    total = a[..., 0].copy()
    for i in range(1, a.shape[-1]):
        total += a[..., i]
    return total


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """The first value of largest magnitude, sign kept (ggml's strict `amax < fabsf(v)` scan)."""
    i = np.abs(x).argmax(axis=-1)[..., None]
    return np.take_along_axis(x, i, axis=-1)[..., 0]


def _by_rows(fit: Callable[..., tuple], x: np.ndarray, *args) -> tuple:
    """fit over chunks of rows (fields concatenated back), so big tensors don't blow up the temporaries."""
    step = max(1, _CHUNK_WEIGHTS // max(1, x.shape[1] * x.shape[2]))
    with np.errstate(all="ignore"):  # inf/nan lanes are masked out, and fp16 overflow is ggml's too
        parts = [fit(x[r:r + step], *args) for r in range(0, max(1, x.shape[0]), step)]
    return type(parts[0])(*(np.concatenate(f, axis=0) for f in zip(*parts)))


# ---------------------------------------------------------------------------------------------------------
# Q8_0, Q4_0, Q4_1, Q5_0: llama.cpp's reference rounding


class _Sym(NamedTuple):
    d: np.ndarray  # float32 [rows, n_blocks], rounded to fp16 only when stored (as ggml does)
    q: np.ndarray  # [rows, n_blocks, 32]


class _Affine(NamedTuple):
    d: np.ndarray
    m: np.ndarray
    q: np.ndarray


def _fit_q8_0(x: np.ndarray) -> _Sym:
    d = np.abs(x).max(axis=-1, keepdims=True) / _F32(127)
    q = np.clip(_roundf(x * _inv(d)), -128, 127).astype(np.int8)
    return _Sym(d[..., 0], q)


def _fit_sym(x: np.ndarray, zero: int) -> _Sym:
    """Q4_0/Q5_0: d = max / −zero with max the signed extreme, so the extreme lands on code 0 and the
    otherwise unused negative end of the grid is spent; codes are trunc(x/d + zero + 0.5)."""
    d = _signed_absmax(x)[..., None] / _F32(-zero)
    v = x * _inv(d) + _F32(zero + 0.5)
    return _Sym(d[..., 0], np.clip(np.trunc(v), 0, 2 * zero - 1).astype(np.uint8))


def _fit_affine(x: np.ndarray, nmax: int) -> _Affine:
    """Q4_1 / Q5_1 as quantize_row_q4_1_ref / q5_1_ref: d = (max − min) / nmax, m = min, codes
    trunc((x − m)/d + 0.5)."""
    lo = x.min(axis=-1, keepdims=True)
    d = (x.max(axis=-1, keepdims=True) - lo) / _F32(nmax)
    v = (x - lo) * _inv(d) + _F32(0.5)
    return _Affine(d[..., 0], lo[..., 0], np.clip(np.trunc(v), 0, nmax).astype(np.uint8))


def _pack_q8_0(f: _Sym) -> np.ndarray:
    return _rows([_f16_bytes(f.d), f.q.astype(np.int8).view(np.uint8)], T.Q8_0)


def _pack_q4_0(f: _Sym) -> np.ndarray:
    return _rows([_f16_bytes(f.d), _nibbles(f.q)], T.Q4_0)


def _pack_q5_0(f: _Sym) -> np.ndarray:
    return _rows([_f16_bytes(f.d), _bit_plane(f.q, 4), _nibbles(f.q)], T.Q5_0)


def _pack_q4_1(f: _Affine) -> np.ndarray:
    return _rows([_f16_bytes(f.d), _f16_bytes(f.m), _nibbles(f.q)], T.Q4_1)


def quantize_q8_0(w) -> np.ndarray:
    """Q8_0 bytes, bit-exact with quantize_row_q8_0_ref: d = absmax/127, q = roundf(x/d)."""
    return _pack_q8_0(_by_rows(_fit_q8_0, _blocks(w, T.Q8_0)))


def _fit_legacy_sym(x, imp, zero: int) -> _Sym:
    """make_qx_quants (rmse_type 1) per 32-block with weights importance·sqrt(σ² + x²), σ² = mean x² over the
    whole row (quantize_row_q4_0_impl / q5_0_impl); d is stored as fp16, the codes are not refitted to it."""
    return _Sym(*_qx_fit(x, _row_weights(x, imp), zero))


def _fit_legacy(w, importance, qtype: T, reference: Callable, imatrix: Callable, n: int):
    """A 32-block type's fields by llama.cpp's reference rule, or by its imatrix search when given an
    importance; `n` is the type's zero point (Q4_0, Q5_0) or largest code (Q4_1, Q5_1)."""
    x = _blocks(w, qtype)
    imp = _importance(importance, x, qtype)
    return _by_rows(reference, x, n) if imp is None else _by_rows(imatrix, x, imp, n)


def fit_q4_0(w, importance=None) -> _Sym:
    """Q4_0 fields (d as float32, codes in [0, 15]): llama.cpp's reference rule, or its imatrix search."""
    return _fit_legacy(w, importance, T.Q4_0, _fit_sym, _fit_legacy_sym, 8)


def fit_q5_0(w, importance=None) -> _Sym:
    """Q5_0 fields; see fit_q4_0."""
    return _fit_legacy(w, importance, T.Q5_0, _fit_sym, _fit_legacy_sym, 16)


def quantize_q4_0(w, importance=None) -> np.ndarray:
    """Q4_0 bytes, bit-exact with quantize_row_q4_0_ref (d = max/−8, the signed extreme), or with an
    importance matrix with quantize_row_q4_0_impl."""
    return _pack_q4_0(fit_q4_0(w, importance))


def quantize_q5_0(w, importance=None) -> np.ndarray:
    """Q5_0 bytes; see quantize_q4_0 (d = max/−16 without an importance matrix)."""
    return _pack_q5_0(fit_q5_0(w, importance))


# ---------------------------------------------------------------------------------------------------------
# Exact carriers for codes that are already quantized (GPTQ/AWQ)


def _codes(codes, lo: int, hi: int, qtype: T) -> np.ndarray:
    a = np.asarray(codes)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{qtype.name}: codes must be an integer array, got {a.dtype}")
    if a.size and (a.min() < lo or a.max() > hi):
        raise ValueError(f"{qtype.name}: codes must lie in [{lo}, {hi}], got [{a.min()}, {a.max()}]")
    return _blocks(a, qtype, dtype=np.int16, name="codes")


def _fp16_exact(x, shape: tuple, qtype: T, name: str) -> np.ndarray:
    """x as float16, refusing anything the cast would change: the carriers promise exact weights."""
    a = np.asarray(x)
    if a.shape != shape:
        raise ValueError(f"{qtype.name}: {name} must have shape {shape} (one per block), got {a.shape}")
    h = a.astype(np.float16)
    if not (np.isfinite(h).all() and np.array_equal(h.astype(np.float64), a.astype(np.float64))):
        raise ValueError(f"{qtype.name}: {name} must be finite and exactly representable in fp16")
    return h


def pack_q4_0(codes, scales) -> np.ndarray:
    """Exact Q4_0 bytes for w = scales·(codes − 8): codes in [0, 15], scales [rows, cols/32]."""
    q = _codes(codes, 0, 15, T.Q4_0)
    return _pack_q4_0(_Sym(_fp16_exact(scales, q.shape[:2], T.Q4_0, "scales"), q.astype(np.uint8)))


def pack_q5_0(codes, scales) -> np.ndarray:
    """Exact Q5_0 bytes for w = scales·(codes − 16): codes in [0, 31], scales [rows, cols/32]."""
    q = _codes(codes, 0, 31, T.Q5_0)
    return _pack_q5_0(_Sym(_fp16_exact(scales, q.shape[:2], T.Q5_0, "scales"), q.astype(np.uint8)))


def pack_q8_0(codes, scales) -> np.ndarray:
    """Exact Q8_0 bytes for w = scales·codes: codes int8 in [−127, 127], scales [rows, cols/32]."""
    q = _codes(codes, -127, 127, T.Q8_0)
    return _pack_q8_0(_Sym(_fp16_exact(scales, q.shape[:2], T.Q8_0, "scales"), q.astype(np.int8)))


def pack_q4_1(codes, d, m) -> np.ndarray:
    """Exact Q4_1 bytes for w = d·codes + m: codes in [0, 15], d and m [rows, cols/32] fp16-representable."""
    q = _codes(codes, 0, 15, T.Q4_1)
    shape = q.shape[:2]
    return _pack_q4_1(_Affine(_fp16_exact(d, shape, T.Q4_1, "d"), _fp16_exact(m, shape, T.Q4_1, "m"),
                              q.astype(np.uint8)))


# ---------------------------------------------------------------------------------------------------------
# Searches shared by the K-quants (ggml-quants.c make_*_quants), vectorised over groups


def _affine_fit(x, wt, nmax: int, rmin: float, rdelta: float, nstep: int, mad: bool = False):
    """Weighted fit of each group (last axis) to scale·l + min, l in [0, nmax], min <= 0
    (make_qkx2_quants / make_qkx3_quants): try nstep+1 stretched grids, refit scale and min by weighted
    least squares on each, keep the best. Returns scale, −min (>= 0) and the codes."""
    lo = np.minimum(x.min(axis=-1), 0)
    hi = x.max(axis=-1)
    flat = hi <= lo  # nothing to spread: ggml returns scale 0 and codes 0
    sum_w, sum_x = _sum(wt), _sum(wt * x)

    def codes(iscale, lo):
        return _nearest(iscale[..., None] * (x - lo[..., None]), 0, nmax)

    def error(scale, lo, L):
        diff = scale[..., None] * L + lo[..., None] - x
        return _sum(wt * (np.abs(diff) if mad else np.square(diff)))  # Q2_K's reference uses |error|

    iscale = _F32(nmax) / _safe(hi - lo, ~flat)
    scale = _F32(1) / iscale
    L = codes(iscale, lo)
    best = error(scale, lo, L)
    for step in range(nstep + 1):
        # ggml rebuilds the trial grid from the best min so far, so later steps start from moved mins
        span = _safe(hi - lo, ~flat)
        trial = codes((_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / span, lo)
        s_l, s_l2, s_xl = _sum(wt * trial), _sum(wt * trial * trial), _sum(wt * trial * x)
        det = sum_w * s_l2 - s_l * s_l
        ok = (det > 0) & ~flat
        t_scale = (sum_w * s_xl - sum_x * s_l) / _safe(det, ok)
        t_min = (s_l2 * sum_x - s_l * s_xl) / _safe(det, ok)
        clamp = t_min > 0  # a positive min is not representable: refit the scale alone
        t_scale = np.where(clamp, s_xl / _safe(s_l2, s_l2 > 0), t_scale)
        t_min = np.where(clamp, _F32(0), t_min)
        err = error(t_scale, t_min, trial)
        take = ok & (err < best)
        best, scale, lo = np.where(take, err, best), np.where(take, t_scale, scale), np.where(take, t_min, lo)
        L = np.where(take[..., None], trial, L)
    scale = np.where(flat, _F32(0), scale)
    return scale, -lo, np.where(flat[..., None], 0, L).astype(np.uint8)


def _qp_fit(x, wt, nmax: int):
    """Positive super-scale and codes in [0, nmax] for non-negative values x (make_qp_quants): best of 9
    grid stretches by weighted error, then coordinate descent on the codes. Returns scale, codes."""
    top = x.max(axis=-1)
    live = top >= _GROUP_MAX_EPS
    top = _safe(top, live)

    def mse(iscale):
        L = np.minimum(np.rint(iscale[..., None] * x), nmax)
        return _sum(wt * np.square(x - (_F32(1) / iscale)[..., None] * L))

    iscale = _F32(nmax) / top
    best = _sum(wt * np.square(x - (_F32(1) / iscale)[..., None] * np.rint(iscale[..., None] * x)))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        cand = (_F32(0.1) * _F32(step) + _F32(nmax)) / top
        err = mse(cand)
        take = err < best
        best, iscale = np.where(take, err, best), np.where(take, cand, iscale)
    L = _nearest(iscale[..., None] * x, 0, nmax)
    sumlx, suml2 = _descend(x, wt, L, nmax)
    scale = np.where(live & (suml2 > 0), sumlx / _safe(suml2, suml2 > 0), _F32(0))
    return scale, np.where(live[..., None], L, 0).astype(np.uint8)


def _descend(x, wt, L, nmax: int, passes: int = 5):
    """make_qp_quants' refinement, in place on L: move one code at a time to where the scale fitted to the
    others puts it, keeping the move if sumlx²/suml2 (the explained energy) grows."""
    sumlx, suml2 = _sum(wt * x * L), _sum(wt * L * L)
    for _ in range(passes):
        moved = False
        for i in range(x.shape[-1]):
            w, xi, li = wt[..., i], x[..., i], L[..., i]
            slx, sl2 = sumlx - w * xi * li, suml2 - w * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = _nearest(xi * sl2 / _safe(slx, ok), 0, nmax)
            slx, sl2 = slx + w * xi * new, sl2 + w * new * new
            take = ok & (new != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[..., i] = np.where(take, new, li)
            sumlx, suml2 = np.where(take, slx, sumlx), np.where(take, sl2, suml2)
            moved = moved or bool(take.any())
        if not moved:  # a pass that changes nothing would change nothing again
            break
    return sumlx, suml2


def _qx_fit(x, wt, nmax: int):
    """Signed scale and codes in [0, 2·nmax) for each group, w = scale·(code − nmax) (make_qx_quants,
    rmse_type 1): the extreme maps to −nmax, then 18 stretched grids, keeping the best least-squares fit."""
    top = _signed_absmax(x)
    live = np.abs(top) >= _GROUP_MAX_EPS
    top = _safe(top, live)

    def trial(stretch):
        l = _nearest((-(_F32(nmax) + stretch) / top)[..., None] * x, -nmax, nmax - 1)
        return l, _sum(wt * x * l), _sum(wt * l * l)

    L, sumlx, suml2 = trial(_F32(0))
    scale = np.where(suml2 != 0, sumlx / _safe(suml2, suml2 != 0), _F32(0))
    best = scale * sumlx
    for step in (-9, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9):
        l, slx, sl2 = trial(_F32(0.1) * _F32(step))
        take = (sl2 > 0) & (slx * slx > best * sl2)
        L = np.where(take[..., None], l, L)
        scale = np.where(take, slx / _safe(sl2, sl2 > 0), scale)
        best = np.where(take, scale * slx, best)
    return np.where(live, scale, _F32(0)), np.where(live[..., None], L + nmax, 0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Q4_K, Q5_K


class KAffine(NamedTuple):
    """Q4_K/Q5_K fields; sub-block s of super-block b holds w = d[b]·sc[b,s]·q − dmin[b]·m[b,s]."""

    d: np.ndarray  # float16 [rows, n_super]
    dmin: np.ndarray  # float16 [rows, n_super]
    sc: np.ndarray  # uint8 [rows, n_super, 8], < 64
    m: np.ndarray  # uint8 [rows, n_super, 8], < 64
    q: np.ndarray  # uint8 [rows, n_super, 256], < 16 (Q4_K) or < 32 (Q5_K)


# llama.cpp's reference search ranges: (rmin, rdelta, nstep) of make_qkx2_quants
_REF_SEARCH = {15: (-1.0, 0.1, 20), 31: (-0.5, 0.1, 15)}
_IMATRIX_SEARCH = (-0.9, 0.05, 36)  # make_qkx3_quants, as quantize_row_q4_K_impl / q5_K_impl call it


def _six_bit_ref(v):
    """The reference 6-bit quantization of 8 sub-block scales: the largest maps to 63."""
    top = np.maximum(v.max(axis=-1), 0)
    inv = np.where(top > 0, _F32(63) / _safe(top, top > 0), _F32(0))
    return top / _F32(63), _nearest(inv[..., None] * v, 0, 63).astype(np.uint8)


def _importance_weights(x, imp):
    """ggml's imatrix weighting: importance times sqrt(σ² + x²), σ² = 2·mean(x²) over the super-block,
    so that tiny weights in an important column still count a little."""
    sigma2 = _F32(2) * _sum((x * x).reshape(*x.shape[:-2], -1))[..., None, None] / _F32(QK_K)
    return imp * np.sqrt(sigma2 + x * x)


def _fit_kaffine(x, imp, nmax: int) -> KAffine:
    xs = x.reshape(*x.shape[:-1], QK_K // _SUB_K, _SUB_K)
    if imp is None:
        # ggml's reference weights: |x| plus the sub-block's RMS, favouring large weights
        wt = np.sqrt(_sum(xs * xs)[..., None] / _F32(_SUB_K)) + np.abs(xs)
        scale, mn, L = _affine_fit(xs, wt, nmax, *_REF_SEARCH[nmax])
        (d, sc), (dmin, m) = _six_bit_ref(scale), _six_bit_ref(mn)
    else:
        wt = _importance_weights(xs, imp.reshape(-1, QK_K // _SUB_K, _SUB_K))
        scale, mn, L = _affine_fit(xs, wt, nmax, *_IMATRIX_SEARCH)
        sw = _sum(wt)
        (d, sc), (dmin, m) = _qp_fit(scale, sw, 63), _qp_fit(mn, sw, 63)
    d, dmin = d.astype(np.float16), dmin.astype(np.float16)
    # codes are refitted to the scales as stored (fp16 × 6 bits), as ggml does after packing them
    ds = d.astype(_F32)[..., None] * sc
    dm = dmin.astype(_F32)[..., None] * m
    refit = _nearest((xs + dm[..., None]) / _safe(ds, ds != 0)[..., None], 0, nmax)
    q = np.where((ds != 0)[..., None], refit, L).astype(np.uint8)
    return KAffine(d, dmin, sc, m, q.reshape(x.shape))


def _scale_bytes(sc, m):
    """12 bytes: sc[0:4] and m[0:4] in bytes 0-7, whose top two bits carry bits 4-5 of sc[4:8] / m[4:8];
    bytes 8-11 hold the low nibbles of sc[4:8] (low) and m[4:8] (high)."""
    s_lo, s_hi, m_lo, m_hi = sc[..., :4], sc[..., 4:], m[..., :4], m[..., 4:]
    return np.concatenate([s_lo | ((s_hi >> 4) << 6), m_lo | ((m_hi >> 4) << 6), (s_hi & 0xF) | (m_hi << 4)],
                          axis=-1)


def _check_kaffine(f: KAffine, nmax: int, qtype: T) -> None:
    n_super = f.d.shape[-1]
    for name, a, hi, shape in (("sc", f.sc, 63, 8), ("m", f.m, 63, 8), ("q", f.q, nmax, QK_K)):
        if a.shape != (*f.d.shape, shape) or (a.size and (a.min() < 0 or a.max() > hi)):
            raise ValueError(f"{qtype.name}: {name} must be [rows, {n_super}, {shape}] in [0, {hi}]")
    if f.dmin.shape != f.d.shape:
        raise ValueError(f"{qtype.name}: d and dmin must have the same shape")


def _nibbles_k(q):
    """Per 64 weights, 32 bytes: first 32 in the low nibbles, next 32 in the high ones."""
    return _nibbles(q.reshape(*q.shape[:-1], QK_K // 64, 64)).reshape(*q.shape[:-1], QK_K // 2)


def pack_q4_k(f: KAffine) -> np.ndarray:
    """Q4_K bytes [rows, n_super * 144] from its fields."""
    _check_kaffine(f, 15, T.Q4_K)
    q = f.q.astype(np.uint8)
    parts = [_f16_bytes(f.d), _f16_bytes(f.dmin), _scale_bytes(f.sc.astype(np.uint8), f.m.astype(np.uint8)),
             _nibbles_k(q)]
    return _rows(parts, T.Q4_K)


def pack_q5_k(f: KAffine) -> np.ndarray:
    """Q5_K bytes [rows, n_super * 176] from its fields."""
    _check_kaffine(f, 31, T.Q5_K)
    q = f.q.astype(np.uint8)
    by_sub = q.reshape(*q.shape[:-1], QK_K // _SUB_K, _SUB_K)
    high = _bit_plane(by_sub, 4, axis=-2)[..., 0, :]  # byte l, bit s = fifth bit of sub-block s, element l
    parts = [_f16_bytes(f.d), _f16_bytes(f.dmin), _scale_bytes(f.sc.astype(np.uint8), f.m.astype(np.uint8)),
             high, _nibbles_k(q)]
    return _rows(parts, T.Q5_K)


def fit_q4_k(w, importance=None) -> KAffine:
    """Q4_K fields of w: llama.cpp's reference search, or its imatrix search when importance is given."""
    x = _blocks(w, T.Q4_K)
    return _by_rows(_fit_kaffine, x, _importance(importance, x, T.Q4_K), 15)


def fit_q5_k(w, importance=None) -> KAffine:
    """Q5_K fields of w; see fit_q4_k."""
    x = _blocks(w, T.Q5_K)
    return _by_rows(_fit_kaffine, x, _importance(importance, x, T.Q5_K), 31)


def quantize_q4_k(w, importance=None) -> np.ndarray:
    """Q4_K bytes. importance: [cols] non-negative (e.g. mean squared activations) — minimises the
    importance-weighted squared error the way llama.cpp's imatrix quantization does."""
    return pack_q4_k(fit_q4_k(w, importance))


def quantize_q5_k(w, importance=None) -> np.ndarray:
    """Q5_K bytes; see quantize_q4_k."""
    return pack_q5_k(fit_q5_k(w, importance))


# ---------------------------------------------------------------------------------------------------------
# Q6_K


class KSym(NamedTuple):
    """Q6_K fields; sub-block s (16 weights) of super-block b holds w = d[b]·sc[b,s]·(q − 32)."""

    d: np.ndarray  # float16 [rows, n_super]
    sc: np.ndarray  # int8 [rows, n_super, 16]
    q: np.ndarray  # uint8 [rows, n_super, 256], < 64


def _fit_q6_k(x, imp) -> KSym:
    xs = x.reshape(*x.shape[:-1], QK_K // _SUB_Q6, _SUB_Q6)
    # reference weights x² favour large weights; with an imatrix ggml uses the importance as is
    wt = xs * xs if imp is None else np.broadcast_to(imp.reshape(-1, QK_K // _SUB_Q6, _SUB_Q6), xs.shape)
    scale, L = _qx_fit(xs, wt, 32)
    top = _signed_absmax(scale)
    live = np.abs(top) >= _GROUP_MAX_EPS
    # the extreme sub-scale maps to −128, using the one int8 value a symmetric rule would waste
    iscale = np.where(live, _F32(-128) / _safe(top, live), _F32(0))
    d = np.where(live, _F32(1) / _safe(iscale, live), _F32(0)).astype(np.float16)
    sc = _nearest(iscale[..., None] * scale, -128, 127)
    ds = d.astype(_F32)[..., None] * sc
    refit = _nearest(xs / _safe(ds, ds != 0)[..., None], -32, 31) + 32
    q = np.where((ds != 0)[..., None], refit, L)
    q = np.where(live[..., None, None], q, 0)  # ggml zeroes a dead super-block outright
    return KSym(d, np.where(live[..., None], sc, 0).astype(np.int8), q.astype(np.uint8).reshape(x.shape))


def pack_q6_k(f: KSym) -> np.ndarray:
    """Q6_K bytes [rows, n_super * 210] from its fields."""
    if f.sc.shape != (*f.d.shape, QK_K // _SUB_Q6) or f.q.shape != (*f.d.shape, QK_K):
        raise ValueError("Q6_K: sc must be [rows, n_super, 16] and q [rows, n_super, 256]")
    if f.q.size and (f.q.min() < 0 or f.q.max() > 63):
        raise ValueError("Q6_K: q must lie in [0, 63]")
    sc = np.asarray(f.sc)
    if sc.size and (sc.min() < -128 or sc.max() > 127):
        raise ValueError("Q6_K: sc must lie in [-128, 127]")
    # per 128 weights: four runs of 32 (k = 0..3); ql pairs run k with run k+2, qh holds two bits per run
    q = f.q.astype(np.uint8).reshape(*f.d.shape, 2, 4, 32)
    ql = (q[..., :2, :] & 0xF) | (q[..., 2:, :] << 4)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
    qh = np.bitwise_or.reduce((q >> 4) << shifts, axis=-2)
    parts = [ql.reshape(*f.d.shape, QK_K // 2), qh.reshape(*f.d.shape, QK_K // 4),
             sc.astype(np.int8).view(np.uint8), _f16_bytes(f.d)]
    return _rows(parts, T.Q6_K)


def fit_q6_k(w, importance=None) -> KSym:
    """Q6_K fields of w: llama.cpp's make_qx_quants search per 16 weights, importance-weighted if given."""
    x = _blocks(w, T.Q6_K)
    return _by_rows(_fit_q6_k, x, _importance(importance, x, T.Q6_K))


def quantize_q6_k(w, importance=None) -> np.ndarray:
    """Q6_K bytes; see quantize_q4_k."""
    return pack_q6_k(fit_q6_k(w, importance))


# ---------------------------------------------------------------------------------------------------------
# Q5_1, and Q4_1 / Q5_1 with an importance matrix (quantize_row_q4_1_impl / q5_1_impl)


def _pack_q5_1(f: _Affine) -> np.ndarray:
    return _rows([_f16_bytes(f.d), _f16_bytes(f.m), _bit_plane(f.q, 4), _nibbles(f.q)], T.Q5_1)


def _row_weights(x, imp):
    """The legacy types' imatrix weighting: importance·sqrt(σ² + x²), σ² = mean x² over the whole row [rows,
    blocks, 32] (the K-quants take σ² per super-block instead: _importance_weights)."""
    sigma2 = _sum(x.reshape(x.shape[0], -1) ** 2)[:, None, None] / _F32(x.shape[1] * x.shape[2])
    return imp.reshape(x.shape[1:]) * np.sqrt(sigma2 + x * x)


def _fit_legacy_affine(x, imp, nmax: int) -> _Affine:
    """make_qkx3_quants per 32-block with weights importance·sqrt(σ² + x²), σ² = mean x² over the whole row;
    d and m are stored as fp16 and the codes are not refitted to them (as ggml)."""
    scale, mn, L = _affine_fit(x, _row_weights(x, imp), nmax, *_IMATRIX_SEARCH)
    return _Affine(scale.astype(np.float16), (-mn).astype(np.float16), L)


def fit_q4_1(w, importance=None) -> _Affine:
    """Q4_1 fields (d, m as fp16, codes): llama.cpp's reference rule, or its imatrix search."""
    return _fit_legacy(w, importance, T.Q4_1, _fit_affine, _fit_legacy_affine, 15)


def fit_q5_1(w, importance=None) -> _Affine:
    """Q5_1 fields; see fit_q4_1."""
    return _fit_legacy(w, importance, T.Q5_1, _fit_affine, _fit_legacy_affine, 31)


def quantize_q4_1(w, importance=None) -> np.ndarray:
    """Q4_1 bytes, bit-exact with quantize_row_q4_1_ref (d = (max − min)/15, m = min), or with an importance
    matrix with quantize_row_q4_1_impl."""
    return _pack_q4_1(fit_q4_1(w, importance))


def quantize_q5_1(w, importance=None) -> np.ndarray:
    """Q5_1 bytes; see quantize_q4_1."""
    return _pack_q5_1(fit_q5_1(w, importance))


def pack_q5_1(codes, d, m) -> np.ndarray:
    """Exact Q5_1 bytes for w = d·codes + m: codes in [0, 31], d and m [rows, cols/32] fp16-representable."""
    q = _codes(codes, 0, 31, T.Q5_1)
    shape = q.shape[:2]
    return _pack_q5_1(_Affine(_fp16_exact(d, shape, T.Q5_1, "d"), _fp16_exact(m, shape, T.Q5_1, "m"),
                              q.astype(np.uint8)))


# ---------------------------------------------------------------------------------------------------------
# Q2_K: sixteen sub-blocks of 16, w = d·sc·q − dmin·m with 4-bit sc and m, 2-bit q


def _nbit_ref(v, nmax: int):
    """The reference quantization of sub-block scales or mins: the largest maps to nmax (fp16 super-scale)."""
    top = np.maximum(v.max(axis=-1), 0)
    live = top > 0
    inv = np.where(live, _F32(nmax) / _safe(top, live), _F32(0))
    return np.where(live, top / _F32(nmax), _F32(0)), np.rint(inv[..., None] * v).astype(np.int64)


def _fit_q2_k(x, imp) -> KAffine:
    xs = x.reshape(*x.shape[:-1], QK_K // _SUB_16, _SUB_16)
    if imp is None:
        scale, mn, L = _affine_fit(xs, np.abs(xs), 3, -0.5, 0.1, 15, mad=True)
        (d, sc), (dmin, m) = _nbit_ref(scale, 15), _nbit_ref(mn, 15)
        byte = (sc & 0xFF) | ((m << 4) & 0xFF)  # ggml ORs the mins into the scale bytes as they are
        sc, m = byte & 0xF, byte >> 4
    else:
        sigma2 = _sum(x * x)[..., None, None] / _F32(QK_K)  # Q2_K's impl: no factor 2, unlike the others
        wt = imp.reshape(-1, QK_K // _SUB_16, _SUB_16) * np.sqrt(sigma2 + xs * xs)
        scale, mn, L = _affine_fit(xs, wt, 3, *_IMATRIX_SEARCH)
        sw = _sum(wt)
        (d, sc), (dmin, m) = _qp_fit(scale, sw, 15), _qp_fit(mn, sw, 15)
    d, dmin = d.astype(np.float16), dmin.astype(np.float16)
    ds = d.astype(_F32)[..., None] * sc.astype(_F32)
    dm = dmin.astype(_F32)[..., None] * m.astype(_F32)
    refit = _nearest((xs + dm[..., None]) / _safe(ds, ds != 0)[..., None], 0, 3)
    q = np.where((ds != 0)[..., None], refit, L).astype(np.uint8)
    return KAffine(d, dmin, sc.astype(np.uint8), m.astype(np.uint8), q.reshape(x.shape))


def _crumbs(q):
    """Per 128 weights, 32 bytes: weight l + 32·k of the run in bits 2k..2k+1 of byte l (Q2_K/Q3_K)."""
    q = q.reshape(*q.shape[:-1], QK_K // 128, 4, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
    return np.bitwise_or.reduce((q & 3) << shifts, axis=-2).reshape(*q.shape[:-3], QK_K // 4)


def pack_q2_k(f: KAffine) -> np.ndarray:
    """Q2_K bytes [rows, n_super * 84] from its fields (sc, m: [rows, n_super, 16] in [0, 15])."""
    for name, a, hi, n in (("sc", f.sc, 15, 16), ("m", f.m, 15, 16), ("q", f.q, 3, QK_K)):
        if a.shape != (*f.d.shape, n) or (a.size and (a.min() < 0 or a.max() > hi)):
            raise ValueError(f"Q2_K: {name} must be [rows, n_super, {n}] in [0, {hi}]")
    scales = f.sc.astype(np.uint8) | (f.m.astype(np.uint8) << 4)
    return _rows([scales, _crumbs(f.q.astype(np.uint8)), _f16_bytes(f.d), _f16_bytes(f.dmin)], T.Q2_K)


def fit_q2_k(w, importance=None) -> KAffine:
    """Q2_K fields: llama.cpp's reference search (|error|, weights |x|), or its imatrix search."""
    x = _blocks(w, T.Q2_K)
    return _by_rows(_fit_q2_k, x, _importance(importance, x, T.Q2_K))


def quantize_q2_k(w, importance=None) -> np.ndarray:
    """Q2_K bytes; see quantize_q4_k."""
    return pack_q2_k(fit_q2_k(w, importance))


# ---------------------------------------------------------------------------------------------------------
# Q3_K: sixteen sub-blocks of 16, w = d·sc·(q − 4) with signed 6-bit sc, 3-bit q


def _q3_search(x, nmax: int):
    """make_q3_quants with do_rmse: the extreme maps to −nmax, then coordinate descent on the signed codes
    in [−nmax, nmax) with weights x². Returns scale and codes + nmax."""
    top = _signed_absmax(x)
    live = np.abs(top) >= _GROUP_MAX_EPS
    top = _safe(top, live)
    L = _nearest((-_F32(nmax) / top)[..., None] * x, -nmax, nmax - 1)
    w = x * x
    sumlx, suml2 = _sum(w * x * L), _sum(w * L * L)
    for _ in range(5):
        moved = False
        for i in range(x.shape[-1]):
            wi, xi, li = w[..., i], x[..., i], L[..., i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = slx > 0
            new = _nearest(xi * sl2 / _safe(slx, ok), -nmax, nmax - 1)
            slx, sl2 = slx + wi * xi * new, sl2 + wi * new * new
            take = ok & (new != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[..., i] = np.where(take, new, li)
            sumlx, suml2 = np.where(take, slx, sumlx), np.where(take, sl2, suml2)
            moved = moved or bool(take.any())
        if not moved:
            break
    scale = np.where(live & (suml2 > 0), sumlx / _safe(suml2, suml2 > 0), _F32(0))
    return scale, np.where(live[..., None], L + nmax, 0).astype(np.uint8)


def _fit_q3_k(x, imp) -> KSym:
    xs = x.reshape(*x.shape[:-1], QK_K // _SUB_16, _SUB_16)
    if imp is None:
        scale, L = _q3_search(xs, 4)
        top = _signed_absmax(scale)
        live = top != 0
        iscale = _F32(-32) / _safe(top, live)
        # a dead super-block keeps its scale bytes zeroed: every stored 6-bit scale reads −32
        sc = np.where(live[..., None], _nearest(iscale[..., None] * scale, -32, 31), -32)
        d = np.where(live, _F32(1) / iscale, _F32(0)).astype(np.float16)
    else:
        sigma2 = _F32(2) * _sum(x * x)[..., None, None] / _F32(QK_K)
        wt = imp.reshape(-1, QK_K // _SUB_16, _SUB_16) * np.sqrt(sigma2 + xs * xs)
        scale, L = _qx_fit(xs, wt, 4)
        d, ls = _qx_fit(scale, _sum(wt), 32)
        d, sc = d.astype(np.float16), ls.astype(np.int64) - 32
    ds = d.astype(_F32)[..., None] * sc.astype(_F32)
    refit = _nearest(xs / _safe(ds, ds != 0)[..., None], -4, 3) + 4
    q = np.where((ds != 0)[..., None], refit, L).astype(np.uint8)
    return KSym(d, sc.astype(np.int8), q.reshape(x.shape))


def pack_q3_k(f: KSym) -> np.ndarray:
    """Q3_K bytes [rows, n_super * 110] from its fields (sc [rows, n_super, 16] in [−32, 31], q in [0, 7])."""
    if f.sc.shape != (*f.d.shape, QK_K // _SUB_16) or f.q.shape != (*f.d.shape, QK_K):
        raise ValueError("Q3_K: sc must be [rows, n_super, 16] and q [rows, n_super, 256]")
    sc = np.asarray(f.sc).astype(np.int16)
    if (f.q.size and (f.q.min() < 0 or f.q.max() > 7)) or (sc.size and (sc.min() < -32 or sc.max() > 31)):
        raise ValueError("Q3_K: q must lie in [0, 7] and sc in [-32, 31]")
    q = f.q.astype(np.uint8)
    hmask = np.packbits((q >> 2).reshape(*q.shape[:-1], 8, 32) & 1, axis=-2, bitorder="little")[..., 0, :]
    ls = (sc + 32).astype(np.uint8)  # bits 0-3: nibbles of bytes 0-7, bits 4-5: crumbs of bytes 8-11
    low = (ls[..., :8] & 0xF) | ((ls[..., 8:] & 0xF) << 4)
    high = ls.reshape(*ls.shape[:-1], 4, 4) >> 4  # [.., j // 4, j % 4]
    high = np.bitwise_or.reduce(high << np.array([0, 2, 4, 6], dtype=np.uint8)[:, None], axis=-2)
    return _rows([hmask, _crumbs(q), low, high, _f16_bytes(f.d)], T.Q3_K)


def fit_q3_k(w, importance=None) -> KSym:
    """Q3_K fields: llama.cpp's reference search (make_q3_quants), or its imatrix search."""
    x = _blocks(w, T.Q3_K)
    return _by_rows(_fit_q3_k, x, _importance(importance, x, T.Q3_K))


def quantize_q3_k(w, importance=None) -> np.ndarray:
    """Q3_K bytes; see quantize_q4_k."""
    return pack_q3_k(fit_q3_k(w, importance))


# ---------------------------------------------------------------------------------------------------------
# IQ4_NL, IQ4_XS: the non-linear 16-level grid, w = scale·KVALUES[q]

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_KV = KVALUES.astype(_F32)


def nearest_level(v: np.ndarray) -> np.ndarray:
    """best_index_int8: the index of the nearest of KVALUES, a tie going to the upper one (beyond either end,
    the end; NaN, the top, as ggml's binary search gives)."""
    mu = np.ones(v.shape, np.uint8)  # the upper of the two levels around v, in 1..15
    for level in _KV[1:-1]:  # 14 compares: 5x faster than searchsorted on 16 levels
        mu += v >= level
    mu[np.isnan(v)] = len(_KV) - 1
    return mu - ((v - _KV[mu - 1]) < (_KV[mu] - v))


def _iq4_scales(x, wt, ntry: int = 7):
    """Per 32-block scale of quantize_row_iq4_nl_impl: d = max/127, weighted refits on the grids
    (itry − 127)/max for itry in [−ntry, ntry], keeping the best by Σwqx²/Σwq²."""
    top = _signed_absmax(x)
    live = np.abs(top) >= _GROUP_MAX_EPS
    top = _safe(top, live)

    def fit(iscale):
        q = _KV[nearest_level(iscale[..., None] * x)]
        return _sum(wt * q * x), _sum(wt * q * q)

    d = -top / _KV[0]
    sqx, sq2 = fit(_F32(1) / d)
    d = np.where(sq2 > 0, sqx / _safe(sq2, sq2 > 0), _F32(0))
    best = d * sqx
    for itry in range(-ntry, ntry + 1):
        sqx, sq2 = fit(_F32(itry + int(KVALUES[0])) / top)
        take = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = np.where(take, sqx / _safe(sq2, take), d)
        best = np.where(take, d * sqx, best)
    return np.where(live, d, _F32(0))


def _iq4_weights(x, imp):
    """x² without an importance matrix, else importance·sqrt(σ² + x²) with σ² = 2·mean x² over the (super-)block."""
    if imp is None:
        return x * x
    flat = x.reshape(*x.shape[:-2], -1)
    sigma2 = _sum(flat * flat)[..., None, None] * (_F32(2) / _F32(flat.shape[-1]))
    return imp.reshape(x.shape[-3:]) * np.sqrt(sigma2 + x * x)


class Levels(NamedTuple):
    """IQ4_NL / IQ4_XS fields: block b holds w = d[b]·KVALUES[q] (IQ4_NL), or super-block b's sub-block s
    holds w = d[b]·sc[b, s]·KVALUES[q] (IQ4_XS, sc in [−32, 31])."""

    d: np.ndarray  # float16 [rows, n_blocks]
    sc: np.ndarray  # int8 [rows, n_super, 8] (IQ4_XS); [rows, 0] for IQ4_NL
    q: np.ndarray  # uint8 [rows, n_blocks, block], < 16


def _fit_iq4_nl(x, imp) -> Levels:
    xs = x[..., None, :]  # each 32-block is its own super-block (σ² over 32 weights)
    d = _iq4_scales(xs, _iq4_weights(xs, imp))[..., 0]
    inv = np.where(d != 0, _F32(1) / _safe(d, d != 0), _F32(0))  # the float scale, not its fp16
    return Levels(d.astype(np.float16), np.zeros((x.shape[0], 0), np.int8), nearest_level(inv[..., None] * x))


def _fit_iq4_xs(x, imp) -> Levels:
    xs = x.reshape(*x.shape[:-1], QK_K // _SUB_IQ4, _SUB_IQ4)
    scales = _iq4_scales(xs, _iq4_weights(xs, imp))
    d = -_signed_absmax(scales) / _F32(32)
    inv = np.where(d != 0, _F32(1) / _safe(d, d != 0), _F32(0))
    ls = _nearest(inv[..., None] * scales, -32, 31)
    dl = d[..., None] * ls  # float d, as ggml, not the fp16 it stores
    idl = np.where(dl != 0, _F32(1) / _safe(dl, dl != 0), _F32(0))
    q = nearest_level(idl[..., None] * xs)
    return Levels(d.astype(np.float16), ls.astype(np.int8), q.reshape(x.shape))


def _check_levels(f: Levels, qtype: T, sub: int) -> None:
    if f.q.size and f.q.max() > 15:
        raise ValueError(f"{qtype.name}: q must lie in [0, 15]")
    if qtype == T.IQ4_XS:
        if f.sc.shape != (*f.d.shape, QK_K // sub) or (f.sc.size and (f.sc.min() < -32 or f.sc.max() > 31)):
            raise ValueError(f"{qtype.name}: sc must be [rows, n_super, 8] in [-32, 31]")


def pack_iq4_nl(f: Levels) -> np.ndarray:
    """IQ4_NL bytes [rows, n_blocks * 18]: fp16 d, then nibbles as Q4_0's."""
    _check_levels(f, T.IQ4_NL, _SUB_IQ4)
    return _rows([_f16_bytes(f.d), _nibbles(f.q.astype(np.uint8))], T.IQ4_NL)


def pack_iq4_xs(f: Levels) -> np.ndarray:
    """IQ4_XS bytes [rows, n_super * 136]: fp16 d, u16 high bits of the 6-bit scales (two per sub-block),
    4 bytes of their low nibbles, then per 32 weights the nibbles as Q4_0's."""
    _check_levels(f, T.IQ4_XS, _SUB_IQ4)
    ls = (f.sc.astype(np.int16) + 32).astype(np.uint16)
    high = np.bitwise_or.reduce((ls >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=-1)
    low = ((ls[..., 0::2] & 0xF) | ((ls[..., 1::2] & 0xF) << 4)).astype(np.uint8)
    q = f.q.astype(np.uint8).reshape(*f.d.shape, QK_K // _SUB_IQ4, _SUB_IQ4)
    return _rows([_f16_bytes(f.d), high.astype("<u2")[..., None].view(np.uint8), low,
                  _nibbles(q).reshape(*f.d.shape, QK_K // 2)], T.IQ4_XS)


def fit_iq4_nl(w, importance=None) -> Levels:
    """IQ4_NL fields as llama.cpp's quantize_iq4_nl (weights x², or the importance matrix's)."""
    x = _blocks(w, T.IQ4_NL)
    return _by_rows(_fit_iq4_nl, x, _importance(importance, x, T.IQ4_NL))


def fit_iq4_xs(w, importance=None) -> Levels:
    """IQ4_XS fields as llama.cpp's quantize_iq4_xs."""
    x = _blocks(w, T.IQ4_XS)
    return _by_rows(_fit_iq4_xs, x, _importance(importance, x, T.IQ4_XS))


def quantize_iq4_nl(w, importance=None) -> np.ndarray:
    return pack_iq4_nl(fit_iq4_nl(w, importance))


def quantize_iq4_xs(w, importance=None) -> np.ndarray:
    return pack_iq4_xs(fit_iq4_xs(w, importance))


# ---------------------------------------------------------------------------------------------------------


def _importance(importance, x: np.ndarray, qtype: T):
    if importance is None:
        return None
    a = np.asarray(importance, dtype=np.float32)
    cols = x.shape[1] * x.shape[2]
    if a.shape != (cols,):
        raise ValueError(f"{qtype.name}: importance must have shape ({cols},), got {a.shape}")
    if not np.isfinite(a).all() or (a < 0).any():
        raise ValueError(f"{qtype.name}: importance must be finite and non-negative")
    return a


QUANTIZERS: dict[T, Callable[..., np.ndarray]] = {
    T.Q8_0: quantize_q8_0, T.Q4_0: quantize_q4_0, T.Q4_1: quantize_q4_1, T.Q5_0: quantize_q5_0,
    T.Q5_1: quantize_q5_1, T.Q2_K: quantize_q2_k, T.Q3_K: quantize_q3_k, T.Q4_K: quantize_q4_k,
    T.Q5_K: quantize_q5_k, T.Q6_K: quantize_q6_k, T.IQ4_NL: quantize_iq4_nl, T.IQ4_XS: quantize_iq4_xs,
}
TAKES_IMPORTANCE = (T.Q4_0, T.Q5_0, T.Q4_1, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS)


def quantize(w, qtype: T, importance=None) -> np.ndarray:
    """Bytes of w as qtype; importance is accepted by TAKES_IMPORTANCE (not Q8_0: llama.cpp ignores it there)."""
    if qtype not in QUANTIZERS:
        names = ", ".join(t.name for t in SUPPORTED)
        raise ValueError(f"{T(qtype).name}: no packer here (supported: {names})")
    if importance is not None and qtype not in TAKES_IMPORTANCE:
        raise ValueError(f"{qtype.name}: importance weighting is not implemented for this type")
    if importance is None:
        return QUANTIZERS[qtype](w)
    return QUANTIZERS[qtype](w, importance)


def encode(w: np.ndarray, qtype: T, importance: np.ndarray | None, name: str) -> np.ndarray:
    """Float weights [rows, cols] as qtype's bytes; `importance` weights the K-quant searches."""
    if qtype in (T.F32, T.F16, T.BF16):  # gguf-py's own encoders
        return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)
    try:
        return quantize(w, qtype, importance if qtype in TAKES_IMPORTANCE else None)
    except ValueError as e:
        raise KananaQuantError(f"{name}: cannot encode as {qtype.name} ({e})") from None


# ---------------------------------------------------------------------------------------------------------
# Carrying quantized codes exactly

CARRIERS = (T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_1)
_CARRIER_BLOCK = 32


def _q8_0_full_range(offsets: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q8_0 bytes with −128 allowed: symmetric 8-bit grids that put the extreme weight on the lowest level
    need it; ggml's int8 storage and dot products take it (llama.cpp's own rounding just never emits it)."""
    rows, cols = offsets.shape
    d = scales.astype("<f2").reshape(rows, cols // _CARRIER_BLOCK, 1).view(np.uint8)
    q = offsets.astype(np.int8).reshape(rows, cols // _CARRIER_BLOCK, _CARRIER_BLOCK).view(np.uint8)
    return np.concatenate([d, q], axis=-1).reshape(rows, -1)


def carry(q: QTensor, qtype: T) -> np.ndarray | None:
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
            return pack_q4_0(offsets + 8, scales)
        if qtype == T.Q5_0 and -16 <= lo and hi <= 15:
            return pack_q5_0(offsets + 16, scales)
        if qtype == T.Q8_0 and -127 <= lo and hi <= 127:
            return pack_q8_0(offsets, scales)
        if qtype == T.Q8_0 and -128 <= lo and hi <= 127 and _fp16_holds(scales):
            return _q8_0_full_range(offsets, scales)
        if qtype == T.Q4_1 and q.bits <= 4:
            return pack_q4_1(q.codes, scales, -scales.astype(np.float64) * zeros)
    except ValueError:  # a scale or Q4_1 minimum that fp16 cannot hold: not exact, so not carried
        return None
    return None


def _fp16_holds(x: np.ndarray) -> bool:
    h = x.astype(np.float16)
    return bool(np.isfinite(h).all() and np.array_equal(h.astype(np.float64), x.astype(np.float64)))
