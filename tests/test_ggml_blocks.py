"""GGML block packers: bytes gguf-py (and so llama.cpp) reads back as the weights we meant."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from kanana_quant.gguf import blocks as gb

SIMPLE = {T.Q8_0: gb.quantize_q8_0, T.Q4_0: gb.quantize_q4_0, T.Q4_1: gb.quantize_q4_1,
          T.Q5_0: gb.quantize_q5_0, T.Q5_1: gb.quantize_q5_1}
BLOCK_256 = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS)
KQUANTS = {T.Q4_K: (gb.fit_q4_k, gb.pack_q4_k), T.Q5_K: (gb.fit_q5_k, gb.pack_q5_k),
           T.Q6_K: (gb.fit_q6_k, gb.pack_q6_k)}
# relative RMS error on N(0, 1) weights, measured (64 x 2048, three seeds): Q8_0 0.54%, Q6_K 1.78%,
# Q5_K 3.63%, Q5_0 4.28%, Q4_K 7.15%, Q4_1 7.83%, Q4_0 8.63%; llama.cpp's reference gives the same.
ERROR_RANGE = {T.Q8_0: (0.003, 0.008), T.Q6_K: (0.014, 0.022), T.Q5_K: (0.030, 0.043),
               T.Q5_0: (0.036, 0.050), T.Q4_K: (0.062, 0.080), T.Q4_1: (0.068, 0.088), T.Q4_0: (0.075, 0.098)}


def dequantize(data: np.ndarray, qtype: T) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(data, qtype)


def gaussian(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def edge_blocks(qtype: T) -> np.ndarray:
    """One 32-weight block per row, each aimed at a rounding rule of the reference quantizers."""
    rng = np.random.default_rng(7)
    rows = [np.zeros(32), np.full(32, 0.3), np.full(32, -2.5), rng.standard_normal(32) * 1e4,
            rng.standard_normal(32) * 7e5,  # fp16 d overflows to inf, as it does in ggml
            rng.standard_normal(32) * 1e-6, rng.standard_normal(32) * 1e-30]
    neg = rng.standard_normal(32)
    neg[5] = -9.0  # negative extreme: Q4_0/Q5_0 take d = max / -8 with the sign
    rows.append(neg)
    both = rng.standard_normal(32)
    both[3], both[9] = 5.0, -5.0  # equal magnitudes: the first one decides the sign of d
    rows.append(both)
    both = both.copy()
    both[3], both[9] = -5.0, 5.0
    rows.append(both)
    rows.append(np.where(np.arange(32) % 2, 1e4, 1e-4))  # huge and tiny in one block
    # ties at .5 after scaling: the grid step is exactly 1, every value sits halfway between two codes
    halves = np.arange(-8, 8) + 0.5
    if qtype == T.Q8_0:
        rows.append(np.concatenate([[127.0], np.arange(-15, 16) + 0.5]))
    elif qtype == T.Q4_0:
        rows.append(np.concatenate([[-8.0], halves[1:], [0.5] * 16]))
    elif qtype == T.Q5_0:
        rows.append(np.concatenate([[-16.0], np.arange(-15, 15) + 0.5, [0.0]]))
    elif qtype == T.Q5_1:  # min 0, max 31 -> d = 1
        rows.append(np.concatenate([[0.0, 31.0], np.arange(0, 30) + 0.5]))
    else:  # Q4_1: min 0, max 15 -> d = 1
        rows.append(np.concatenate([[0.0, 15.0], np.arange(0, 15) + 0.5, np.arange(15) + 0.5]))
    return np.stack(rows).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Sizes


def test_type_sizes_come_from_gguf_py():
    for qtype in gb.SUPPORTED:
        assert (gb.BLOCK_SIZES[qtype], gb.TYPE_SIZES[qtype]) == gguf.GGML_QUANT_SIZES[qtype]


@pytest.mark.parametrize("qtype", list(gb.QUANTIZERS), ids=lambda t: t.name)
def test_output_shape_and_dtype(qtype):
    w = gaussian(3, 512)
    out = gb.QUANTIZERS[qtype](w)
    assert out.dtype == np.uint8
    assert out.shape == (3, 512 // gb.BLOCK_SIZES[qtype] * gb.TYPE_SIZES[qtype])


@pytest.mark.parametrize("qtype", list(gb.QUANTIZERS), ids=lambda t: t.name)
def test_bad_shapes_are_rejected(qtype):
    with pytest.raises(ValueError, match="multiple"):
        gb.QUANTIZERS[qtype](np.zeros((2, 256 + 32), np.float32) if qtype in BLOCK_256 else np.zeros((2, 48)))
    with pytest.raises(ValueError, match="2-D"):
        gb.QUANTIZERS[qtype](np.zeros(256, np.float32))


# ---------------------------------------------------------------------------------------------------------
# Q8_0 / Q4_0 / Q4_1 / Q5_0: bit for bit what gguf-py (llama.cpp's reference rounding) writes


@pytest.mark.parametrize("qtype", list(SIMPLE), ids=lambda t: t.name)
def test_simple_types_match_gguf_py_bit_for_bit(qtype):
    w = np.concatenate([gaussian(20, 32, seed=1) * np.logspace(-3, 3, 20, dtype=np.float32)[:, None],
                        edge_blocks(qtype)]).reshape(-1, 64)
    ours = SIMPLE[qtype](w)
    with np.errstate(all="ignore"):
        theirs = gguf.quants.quantize(w, qtype)
    mismatched = np.flatnonzero((ours != theirs).any(axis=1))
    assert mismatched.size == 0, f"rows {mismatched.tolist()} differ"


def test_q4_0_uses_the_signed_extreme():
    w = np.zeros((1, 32), np.float32)
    w[0, 0], w[0, 1] = 1.0, -4.0  # the extreme is negative: d = -4 / -8 = 0.5, and -4 sits on code 0
    out = gb.quantize_q4_0(w)
    assert np.frombuffer(out[0, :2].tobytes(), "<f2")[0] == 0.5
    np.testing.assert_array_equal(dequantize(out, T.Q4_0)[0, :2], [1.0, -4.0])


def test_ties_round_like_the_reference():
    # Q8_0 rounds halves away from zero (roundf); Q4_0 truncates x/d + 8.5, so -0.5 goes up to 0
    w8 = np.concatenate([[127.0, 2.5, -2.5, 0.5, -0.5], np.zeros(27)]).astype(np.float32)[None]
    np.testing.assert_array_equal(dequantize(gb.quantize_q8_0(w8), T.Q8_0)[0, :5], [127, 3, -3, 1, -1])
    w4 = np.concatenate([[-8.0, 2.5, -2.5, 0.5, -0.5], np.zeros(27)]).astype(np.float32)[None]
    np.testing.assert_array_equal(dequantize(gb.quantize_q4_0(w4), T.Q4_0)[0, :5], [-8, 3, -2, 1, 0])


# ---------------------------------------------------------------------------------------------------------
# Every type, with and without an importance matrix: bit for bit what llama.cpp's own quantizer writes
# (ggml_quantize_chunk in the libggml-base that llama-cpp-python built: what llama-quantize calls per tensor)


def ggml_quantize_chunk(w: np.ndarray, qtype: T, imatrix: np.ndarray | None) -> np.ndarray:
    import ctypes
    import os

    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    w = np.ascontiguousarray(w, np.float32)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((w.shape[0], w.shape[1] // block * size), np.uint8)
    imp = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
    written = fn(int(qtype), w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1],
                 None if imp is None else imp.ctypes.data)
    assert written == out.size
    return out


def oracle_tensor(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows over six decades of scale with the cases the searches branch on, and an importance matrix with
    dead columns."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((24, 1024)).astype(np.float32) * np.logspace(-2, 1, 24, dtype=np.float32)[:, None]
    w[3, :256] = 0  # a dead super-block
    w[4, :256] = -0.7  # constant negative
    w[5, 300] = 40.0  # one outlier
    w[6, 32:64] = 0  # a dead 32-block inside a live super-block
    w[7] = np.where(np.arange(1024) % 2, 1e3, 1e-3)  # huge and tiny interleaved
    imp = np.exp(rng.standard_normal(1024)).astype(np.float32)
    imp[5:40] = 0
    return w, imp


_ORACLE_TYPES = list(gb.QUANTIZERS)


# the imatrix case only for the types whose importance-weighted search is ours to match
@pytest.mark.parametrize(("qtype", "with_importance"),
                         [(t, False) for t in _ORACLE_TYPES] + [(t, True) for t in _ORACLE_TYPES
                                                                if t in gb.TAKES_IMPORTANCE],
                         ids=lambda v: v.name if hasattr(v, "name") else ("imatrix" if v else "reference"))
def test_bytes_equal_llamacpp_quantizer(qtype, with_importance):
    for seed in (0, 1):
        w, imp = oracle_tensor(seed)
        imp = imp if with_importance else None
        ours = gb.quantize(w, qtype, imp)
        theirs = ggml_quantize_chunk(w, qtype, imp)
        mismatched = np.flatnonzero((ours != theirs).any(axis=1))
        assert mismatched.size == 0, f"seed {seed}: rows {mismatched.tolist()} differ"


def test_iq4_nearest_level_breaks_ties_upward():
    levels = gb.KVALUES.astype(np.float32)
    mid = (levels[:-1] + levels[1:]) / 2
    np.testing.assert_array_equal(gb.nearest_level(mid), np.arange(1, 16))
    np.testing.assert_array_equal(gb.nearest_level(levels), np.arange(16))
    np.testing.assert_array_equal(gb.nearest_level(np.array([-1e9, 1e9, 0.0], np.float32)), [0, 15, 8])


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ4_XS, T.Q5_1], ids=lambda t: t.name)
def test_new_types_decode_close_to_the_weights(qtype):
    w = gaussian(16, 1024, seed=2)
    err = rel_rms(dequantize(gb.quantize(w, qtype), qtype), w)
    # measured here: Q2_K 0.295, Q3_K 0.152, IQ4_NL 0.076, IQ4_XS 0.077, Q5_1 0.038
    assert err < {T.Q2_K: 0.33, T.Q3_K: 0.17, T.IQ4_NL: 0.085, T.IQ4_XS: 0.085, T.Q5_1: 0.042}[qtype]


# ---------------------------------------------------------------------------------------------------------
# K-quants: the bytes decode to the fields we fitted


def k_test_tensor() -> np.ndarray:
    w = gaussian(6, 512, seed=3) * np.array([1, 1e-3, 50, 1, 1, 1], np.float32)[:, None]
    w[3, :256] = 0  # a dead super-block
    w[4, :256] = -0.7  # constant negative: all of it must live in the min
    w[4, 256:] = 0.7  # constant positive: all of it in the scale
    w[5, 300] = 40.0  # one outlier squeezing the other sub-blocks' 6-bit scales
    return w


def formula(qtype: T, f) -> np.ndarray:
    d = f.d.astype(np.float32)[..., None]
    if qtype == T.Q6_K:
        sub = np.repeat(d * f.sc.astype(np.float32), 16, axis=-1)
        return (sub * (f.q.astype(np.float32) - 32)).reshape(f.q.shape[0], -1)
    scale = np.repeat(d * f.sc.astype(np.float32), 32, axis=-1)
    low = np.repeat(f.dmin.astype(np.float32)[..., None] * f.m.astype(np.float32), 32, axis=-1)
    return (scale * f.q.astype(np.float32) - low).reshape(f.q.shape[0], -1)


@pytest.mark.parametrize("with_importance", [False, True])
@pytest.mark.parametrize("qtype", list(KQUANTS), ids=lambda t: t.name)
def test_k_quant_bytes_decode_to_the_fitted_fields(qtype, with_importance):
    w = k_test_tensor()
    imp = np.exp(np.random.default_rng(4).standard_normal(512)).astype(np.float32)
    imp = imp if with_importance else None
    fit, pack = KQUANTS[qtype]
    fields = fit(w, imp)
    out = pack(fields)
    np.testing.assert_allclose(dequantize(out, qtype), formula(qtype, fields), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(out, gb.QUANTIZERS[qtype](w, imp))
    deq = dequantize(out, qtype)
    assert np.all(deq[3, :256] == 0)
    np.testing.assert_allclose(deq[4], w[4], rtol=0.01)
    assert rel_rms(deq[1], w[1]) < 0.1  # tiny weights keep their own scales


@pytest.mark.parametrize("qtype", list(KQUANTS), ids=lambda t: t.name)
def test_k_quant_codes_are_the_nearest_on_the_stored_grid(qtype):
    # llama.cpp refits every code after rounding the scales to fp16 x 6 (or 8) bits; stale codes would
    # still decode, just worse
    w = gaussian(8, 512, seed=9)
    f = KQUANTS[qtype][0](w)
    rows, n_super = f.d.shape
    sub = 16 if qtype == T.Q6_K else 32
    x = w.reshape(rows, n_super, -1, sub)
    step = (f.d.astype(np.float32)[..., None] * f.sc.astype(np.float32))[..., None]
    if qtype == T.Q6_K:
        expected = np.clip(np.rint(x / step), -32, 31) + 32
    else:
        low = (f.dmin.astype(np.float32)[..., None] * f.m.astype(np.float32))[..., None]
        expected = np.clip(np.rint((x + low) / step), 0, 15 if qtype == T.Q4_K else 31)
    assert np.all(step != 0)
    np.testing.assert_array_equal(f.q.reshape(expected.shape), expected)


def test_k_quant_packers_reject_out_of_range_fields():
    f = gb.fit_q4_k(gaussian(1, 256))
    with pytest.raises(ValueError, match="q must be"):
        gb.pack_q4_k(f._replace(q=f.q + 16))
    with pytest.raises(ValueError, match="sc must be"):
        gb.pack_q5_k(f._replace(sc=f.sc | 64))
    f6 = gb.fit_q6_k(gaussian(1, 256))
    with pytest.raises(ValueError, match="q must lie"):
        gb.pack_q6_k(f6._replace(q=f6.q + 64))


# ---------------------------------------------------------------------------------------------------------
# Quality


@pytest.fixture(scope="module")
def gaussian_errors() -> dict:
    w = gaussian(64, 2048, seed=11)
    return {qtype: rel_rms(dequantize(quantize(w), qtype), w) for qtype, quantize in gb.QUANTIZERS.items()}


@pytest.mark.parametrize("qtype", list(ERROR_RANGE), ids=lambda t: t.name)
def test_error_is_in_the_expected_range_for_the_bit_width(gaussian_errors, qtype):
    lo, hi = ERROR_RANGE[qtype]
    assert lo < gaussian_errors[qtype] < hi


def test_k_quants_beat_the_simple_types_of_similar_bits(gaussian_errors):
    e = gaussian_errors
    assert e[T.Q4_K] < e[T.Q4_1] < e[T.Q4_0]
    assert e[T.Q5_K] < e[T.Q5_0]
    assert e[T.Q8_0] < e[T.Q6_K] < e[T.Q5_K] < e[T.Q4_K]


@pytest.mark.parametrize("qtype", list(KQUANTS), ids=lambda t: t.name)
def test_importance_lowers_the_importance_weighted_error(qtype):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((32, 1024)).astype(np.float32)
    imp = np.exp(3 * rng.standard_normal(1024)).astype(np.float32)
    quantize = gb.QUANTIZERS[qtype]

    def weighted(out):
        return np.sum(imp * (dequantize(out, qtype) - w) ** 2) / np.sum(imp * w ** 2)

    # measured: Q4_K 0.0064 -> 0.0006, Q5_K 0.0013 -> 0.0002, Q6_K 0.0004 -> 0.0001
    assert weighted(quantize(w, imp)) < 0.5 * weighted(quantize(w))


def test_importance_is_validated():
    w = gaussian(2, 256)
    with pytest.raises(ValueError, match="shape"):
        gb.quantize_q4_k(w, np.ones(128))
    with pytest.raises(ValueError, match="non-negative"):
        gb.quantize_q6_k(w, -np.ones(256))
    with pytest.raises(ValueError, match="not implemented for this type"):
        gb.quantize(w, T.Q8_0, importance=np.ones(256))


# ---------------------------------------------------------------------------------------------------------
# Exact carriers for GPTQ/AWQ codes


def fp16_scales(rows: int, groups: int, seed: int) -> np.ndarray:
    s = np.random.default_rng(seed).standard_normal((rows, groups)).astype(np.float16)
    s[0, 0] = 0  # a dead group
    s[-1, -1] = np.float16(65504)  # the largest finite fp16
    return s.astype(np.float32)


def random_codes(lo: int, hi: int, shape, seed: int) -> np.ndarray:
    q = np.random.default_rng(seed).integers(lo, hi + 1, size=shape)
    q[0, :2] = lo, hi  # both ends of the range
    return q


@pytest.mark.parametrize("qtype, lo, hi, zero",
                         [(T.Q4_0, 0, 15, 8), (T.Q5_0, 0, 31, 16), (T.Q8_0, -127, 127, 0)],
                         ids=["Q4_0", "Q5_0", "Q8_0"])
def test_symmetric_carriers_round_trip_exactly(qtype, lo, hi, zero):
    pack = {T.Q4_0: gb.pack_q4_0, T.Q5_0: gb.pack_q5_0, T.Q8_0: gb.pack_q8_0}[qtype]
    codes = random_codes(lo, hi, (4, 128), seed=1).astype(np.int8 if lo < 0 else np.uint8)
    scales = fp16_scales(4, 4, seed=2)
    expected = np.repeat(scales, 32, axis=1) * (codes.astype(np.float32) - zero)
    np.testing.assert_array_equal(dequantize(pack(codes, scales), qtype), expected)


def test_q4_1_carrier_round_trips_exactly():
    codes = random_codes(0, 15, (4, 128), seed=3).astype(np.uint8)
    d, m = fp16_scales(4, 4, seed=4), fp16_scales(4, 4, seed=5)
    m[-1, -1] = 0  # keep d·q + m finite next to the largest d
    expected = np.repeat(d, 32, axis=1) * codes + np.repeat(m, 32, axis=1)
    np.testing.assert_array_equal(dequantize(gb.pack_q4_1(codes, d, m), T.Q4_1), expected)


@pytest.mark.parametrize("bad, match", [
    (dict(codes=np.full((1, 32), 16)), r"\[0, 15\]"),
    (dict(codes=np.full((1, 32), -1)), r"\[0, 15\]"),
    (dict(codes=np.full((1, 32), 1.0)), "integer"),
    (dict(scales=np.full((1, 1), 0.1, np.float32)), "fp16"),
    (dict(scales=np.full((1, 1), np.inf, np.float32)), "fp16"),
    (dict(scales=np.ones((1, 2))), "shape"),
    (dict(codes=np.zeros((1, 40), np.uint8)), "multiple"),
])
def test_carriers_refuse_what_they_cannot_hold_exactly(bad, match):
    args = dict(codes=np.zeros((1, 32), np.uint8), scales=np.ones((1, 1), np.float32)) | bad
    with pytest.raises(ValueError, match=match):
        gb.pack_q4_0(**args)


def test_other_carriers_check_their_own_ranges():
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        gb.pack_q8_0(np.full((1, 32), -128, np.int16), np.ones((1, 1)))
    with pytest.raises(ValueError, match=r"\[0, 31\]"):
        gb.pack_q5_0(np.full((1, 32), 32), np.ones((1, 1)))
    with pytest.raises(ValueError, match="m must be"):
        gb.pack_q4_1(np.zeros((1, 32), np.uint8), np.ones((1, 1)), np.full((1, 1), 1 / 3))
