"""GPTQ v1 / AWQ GEMM packing: round trips, hand-worked words, and independent oracles ported from the
reference readers and writers (AutoGPTQ qlinear_cuda_old pack() + torch dequant, AutoAWQ from_linear +
unpack_awq/reverse_awq_order/dequantize_gemm), so a layout mistake in packing.py cannot hide behind a
matching mistake in its own unpacker."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kanana_quant.errors import KananaQuantError
from kanana_quant.quant.packing import pack_awq, pack_gptq, unpack_awq, unpack_gptq
from packing_oracles import autoawq_dequant, autogptq_dequant

GROUPS = (32, 64, 128, -1)


def _random_case(rng, out_f, in_f, bits, group_size, zero_low=0):
    gs = in_f if group_size == -1 else group_size
    n_groups = in_f // gs
    maxq = (1 << bits) - 1
    codes = rng.integers(0, maxq + 1, size=(out_f, in_f), dtype=np.uint8)
    zeros = rng.integers(zero_low, maxq + 1, size=(out_f, n_groups), dtype=np.int64)
    # Random fp16 bit patterns restricted to normal, modest magnitudes: exactly representable by construction.
    mags = rng.uniform(1e-3, 4.0, size=(out_f, n_groups)).astype(np.float16)
    signs = rng.choice([-1.0, 1.0], size=(out_f, n_groups)).astype(np.float16)
    scales = (mags * signs).astype(np.float32)
    return codes, zeros, scales


def _expected_fp16(codes, zeros, scales, group_size):
    """Our convention's dequantised weight [out, in], rounded once to fp16 as the fp16 readers do."""
    in_f = codes.shape[1]
    gs = in_f if group_size == -1 else group_size
    g = np.arange(in_f) // gs
    w = scales.astype(np.float64)[:, g] * (codes.astype(np.int64) - np.asarray(zeros, np.int64)[:, g])
    return w.astype(np.float16)


# ---------------------------------------------------------------------------------------------------------
# Oracles ported from the reference implementations (torch / plain loops, independent of packing.py)


def autogptq_pack_reference(codes, zeros, bits):
    """AutoGPTQ qlinear_cuda_old.QuantLinear.pack, word loop for word loop (codes [out, in], zeros [out, G])."""
    intweight = codes.T.astype(np.uint32)  # [in, out]
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    z = (np.asarray(zeros).T.astype(np.int64) - 1).astype(np.uint32)  # [G, out]
    qzeros = np.zeros((z.shape[0], z.shape[1] // 32 * bits), dtype=np.uint32)

    def pack_axis(dst, take, put):
        i = row = 0
        while row < dst.shape[0 if put is None else 1]:
            def orr(r, val):
                if put is None:
                    dst[r] |= val
                else:
                    dst[:, r] |= val
            if bits in (2, 4, 8):
                for j in range(i, i + 32 // bits):
                    orr(row, take(j) << np.uint32(bits * (j - i)))
                i += 32 // bits
                row += 1
            else:
                for j in range(i, i + 10):
                    orr(row, take(j) << np.uint32(3 * (j - i)))
                i += 10
                orr(row, take(i) << np.uint32(30))
                row += 1
                orr(row, (take(i) >> np.uint32(2)) & np.uint32(1))
                i += 1
                for j in range(i, i + 10):
                    orr(row, take(j) << np.uint32(3 * (j - i) + 1))
                i += 10
                orr(row, take(i) << np.uint32(31))
                row += 1
                orr(row, (take(i) >> np.uint32(1)) & np.uint32(0x3))
                i += 1
                for j in range(i, i + 10):
                    orr(row, take(j) << np.uint32(3 * (j - i) + 2))
                i += 10
                row += 1

    pack_axis(qweight, lambda j: intweight[j], None)
    pack_axis(qzeros, lambda j: z[:, j], "cols")
    return qweight.view(np.int32), qzeros.view(np.int32)


AWQ_ORDER_REF = [0, 2, 4, 6, 1, 3, 5, 7]


def autoawq_pack_reference(codes, zeros):
    """AutoAWQ WQLinear_GEMM.from_linear packing loops (codes [out, in], zeros [out, G])."""
    intweight = torch.from_numpy(codes.T.astype(np.int32).copy())
    z = torch.from_numpy(np.asarray(zeros).T.astype(np.int32).copy())
    out = []
    for src in (intweight, z):
        dst = torch.zeros((src.shape[0], src.shape[1] // 32 * 4), dtype=torch.int32)
        for col in range(src.shape[1] // 8):
            for i in range(8):
                dst[:, col] |= src[:, col * 8 + AWQ_ORDER_REF[i]] << (i * 4)
        out.append(dst.numpy())
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_gptq_round_trip(bits, group_size):
    rng = np.random.default_rng(1000 * bits + group_size)
    codes, zeros, scales = _random_case(rng, 96, 256, bits, group_size, zero_low=1)
    t = pack_gptq(codes, zeros, scales, bits, group_size)
    n_groups = zeros.shape[1]
    assert t["qweight"].dtype == np.int32 and t["qweight"].shape == (256 * bits // 32, 96)
    assert t["qzeros"].dtype == np.int32 and t["qzeros"].shape == (n_groups, 96 * bits // 32)
    assert t["scales"].dtype == np.float16 and t["scales"].shape == (n_groups, 96)
    gs = 256 if group_size == -1 else group_size
    np.testing.assert_array_equal(t["g_idx"], np.arange(256) // gs)
    assert t["g_idx"].dtype == np.int32
    c2, z2, s2 = unpack_gptq(t, bits, group_size)
    assert c2.dtype == np.uint8
    np.testing.assert_array_equal(c2, codes)
    np.testing.assert_array_equal(z2, zeros)
    np.testing.assert_array_equal(s2, scales)


@pytest.mark.parametrize("group_size", GROUPS)
def test_awq_round_trip(group_size):
    rng = np.random.default_rng(7 + group_size)
    codes, zeros, scales = _random_case(rng, 96, 256, 4, group_size, zero_low=0)
    t = pack_awq(codes, zeros, scales, group_size)
    n_groups = zeros.shape[1]
    assert t["qweight"].dtype == np.int32 and t["qweight"].shape == (256, 96 // 8)
    assert t["qzeros"].dtype == np.int32 and t["qzeros"].shape == (n_groups, 96 // 8)
    assert t["scales"].dtype == np.float16 and t["scales"].shape == (n_groups, 96)
    c2, z2, s2 = unpack_awq(t, group_size)
    np.testing.assert_array_equal(c2, codes)
    np.testing.assert_array_equal(z2, zeros)
    np.testing.assert_array_equal(s2, scales)


# ---------------------------------------------------------------------------------------------------------
# Hand-worked words


def test_gptq_4bit_hand_words():
    # One output column, 32 inputs: qweight[r, 0] = sum_j codes[0, 8r + j] << 4j.
    codes = (np.arange(32) % 16).astype(np.uint8)[None, :].repeat(8, axis=0)
    zeros = np.full((8, 1), 8)
    t = pack_gptq(codes, zeros, np.ones((8, 1), np.float32), 4, -1)
    assert [int(w) for w in t["qweight"][:, 0].view(np.uint32)] == [0x76543210, 0xFEDCBA98, 0x76543210, 0xFEDCBA98]
    # qzeros holds zero - 1 = 7 in every nibble of the single word covering the 8 output columns.
    assert int(t["qzeros"][0, 0]) == 0x77777777


def test_gptq_2bit_and_8bit_hand_words():
    codes = np.array([[1, 2, 3, 0] * 8], dtype=np.uint8).repeat(16, axis=0)
    t = pack_gptq(codes, np.full((16, 1), 2), np.ones((16, 1)), 2, -1)
    # 2-bit: value j at bits 2j; pattern 1,2,3,0 -> 0b00111001 = 0x39 per byte.
    assert int(t["qweight"][0, 0].view(np.uint32)) == 0x39393939
    assert int(t["qzeros"][0, 0]) == 0x55555555  # zero 2 stored as 1 in every 2-bit field
    codes8 = np.array([[0x11, 0x22, 0x33, 0xFE] * 8], dtype=np.uint8).repeat(4, axis=0)
    zeros8 = np.array([[1], [2], [3], [255]])
    t8 = pack_gptq(codes8, zeros8, np.ones((4, 1)), 8, -1)
    assert int(t8["qweight"][0, 0].view(np.uint32)) == 0xFE332211
    assert int(t8["qzeros"][0, 0].view(np.uint32)) == 0xFE020100


def test_gptq_3bit_straddling_words():
    # Values 10 and 21 of each 32-run cross word boundaries: bits 30..32 and 63..65 of the 96-bit run.
    codes = np.zeros((32, 32), dtype=np.uint8)
    codes[:, 10] = 0b101
    codes[:, 21] = 0b110
    codes[:, 0] = 0b111
    codes[:, 31] = 0b011
    zeros = np.ones((32, 1), dtype=np.int64)
    zeros[10, 0] = 0b110  # stored as 0b101: straddles qzeros words 0/1
    zeros[21, 0] = 0b111  # stored as 0b110: straddles qzeros words 1/2
    t = pack_gptq(codes, zeros, np.ones((32, 1)), 3, -1)
    w = [int(x) for x in t["qweight"][:, 0].view(np.uint32)]
    assert w[0] == (0b111 | (0b01 << 30))          # value 0 at bit 0; low 2 bits of value 10 at bits 30-31
    assert w[1] == (0b1 | (0b0 << 31))              # high bit of value 10 at bit 0; low bit of value 21 (0)
    assert w[2] == (0b11 | (0b011 << 29))           # high 2 bits of value 21 at bits 0-1; value 31 at bit 29
    z = [int(x) for x in t["qzeros"][0].view(np.uint32)]
    assert z == [0b01 << 30, 0b1 | (0b0 << 31), 0b11]


def test_awq_interleave_hand_words():
    # Output columns 0..7 hold values 0..7: nibble i holds column AWQ_ORDER[i] -> 0x75316420.
    codes = np.tile(np.arange(8, dtype=np.uint8)[:, None], (1, 4))  # [out=8, in=4]
    zeros = np.arange(8, dtype=np.int64)[:, None] + 8                # zeros 8..15
    t = pack_awq(codes, zeros, np.ones((8, 1)), -1)
    assert t["qweight"].shape == (4, 1)
    assert all(int(x) == 0x75316420 for x in t["qweight"][:, 0].view(np.uint32))
    assert int(t["qzeros"][0, 0].view(np.uint32)) == 0xFDB9ECA8  # zeros stored as is: no -1 in AWQ


# ---------------------------------------------------------------------------------------------------------
# Against the reference writers and readers


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_gptq_matches_autogptq_pack_loop(bits):
    rng = np.random.default_rng(bits)
    codes, zeros, scales = _random_case(rng, 64, 128, bits, 32, zero_low=1)
    ref_qweight, ref_qzeros = autogptq_pack_reference(codes, zeros, bits)
    t = pack_gptq(codes, zeros, scales, bits, 32)
    np.testing.assert_array_equal(t["qweight"], ref_qweight)
    np.testing.assert_array_equal(t["qzeros"], ref_qzeros)


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_gptq_autogptq_dequant_oracle(bits, group_size):
    rng = np.random.default_rng(31 * bits + group_size)
    codes, zeros, scales = _random_case(rng, 64, 256, bits, group_size, zero_low=1)
    t = pack_gptq(codes, zeros, scales, bits, group_size)
    got = autogptq_dequant(t["qweight"], t["qzeros"], t["scales"], bits, group_size)
    assert got.dtype == torch.float16
    np.testing.assert_array_equal(got.numpy(), _expected_fp16(codes, zeros, scales, group_size).T)


def test_gptq_zero_minus_one_convention_is_what_the_reader_undoes():
    # If qzeros held the raw zero, AutoGPTQ's reader (+1) would be off by one scale everywhere.
    codes = np.full((32, 32), 5, dtype=np.uint8)
    zeros = np.full((32, 1), 3)
    t = pack_gptq(codes, zeros, np.full((32, 1), 0.5, np.float32), 4, -1)
    got = autogptq_dequant(t["qweight"], t["qzeros"], t["scales"], 4, -1).numpy()
    assert np.all(got == np.float16(1.0))  # 0.5 * (5 - 3)


@pytest.mark.parametrize("group_size", GROUPS)
def test_awq_matches_autoawq_pack_and_dequant(group_size):
    rng = np.random.default_rng(99 + group_size)
    codes, zeros, scales = _random_case(rng, 64, 256, 4, group_size, zero_low=0)
    t = pack_awq(codes, zeros, scales, group_size)
    ref_qweight, ref_qzeros = autoawq_pack_reference(codes, zeros)
    np.testing.assert_array_equal(t["qweight"], ref_qweight)
    np.testing.assert_array_equal(t["qzeros"], ref_qzeros)
    got = autoawq_dequant(t["qweight"], t["qzeros"], t["scales"], group_size)
    assert got.dtype == torch.float16
    np.testing.assert_array_equal(got.numpy(), _expected_fp16(codes, zeros, scales, group_size).T)


def test_unpack_gptq_reads_foreign_all_ones_zero_field_as_two_to_the_bits():
    # Some v1 writers wrap zero 0 to an all-ones field; AutoGPTQ/vLLM read that back as 2^bits.
    codes = np.zeros((8, 32), dtype=np.uint8)
    t = pack_gptq(codes, np.full((8, 1), 4), np.ones((8, 1)), 4, -1)
    t["qzeros"] = np.array([[-1]], dtype=np.int32)
    _, zeros, _ = unpack_gptq(t, 4, -1)
    assert zeros.tolist() == [[16]] * 8
    ref = autogptq_dequant(t["qweight"], t["qzeros"], t["scales"], 4, -1).numpy()
    assert np.all(ref == -16)


def test_large_matrix_is_vectorised():
    # A Kanana-sized projection slice must pack and unpack without per-element Python work.
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(2048, 4096), dtype=np.uint8)
    zeros = rng.integers(1, 16, size=(2048, 32))
    scales = np.ones((2048, 32), np.float32)
    c2, z2, _ = unpack_gptq(pack_gptq(codes, zeros, scales, 4, 128), 4, 128)
    assert np.array_equal(c2, codes) and np.array_equal(z2, zeros)
    c3, _, _ = unpack_awq(pack_awq(codes, zeros, scales, 128), 128)
    assert np.array_equal(c3, codes)


# ---------------------------------------------------------------------------------------------------------
# Errors


def _raises_one_line(fn, *args, match=None, **kwargs):
    with pytest.raises(KananaQuantError, match=match) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


def _ok(out_f, in_f, bits, group_size=-1, zero=1):
    gs = in_f if group_size == -1 else group_size
    return (np.zeros((out_f, in_f), np.uint8), np.full((out_f, in_f // gs), zero),
            np.ones((out_f, in_f // gs), np.float32))


@pytest.mark.parametrize("bits", (1, 5, 16))
def test_gptq_rejects_unsupported_bits(bits):
    _raises_one_line(pack_gptq, *_ok(32, 32, 4), bits, -1, match="bits")
    _raises_one_line(unpack_gptq, pack_gptq(*_ok(32, 32, 4), 4, -1), bits, -1, match="bits")


def test_gptq_rejects_in_features_not_multiple_of_32_for_3bit():
    _raises_one_line(pack_gptq, *_ok(32, 48, 3, group_size=16), 3, 16, match="in_features 48")


@pytest.mark.parametrize("bits,out_f", [(4, 12), (2, 24), (8, 6), (3, 48)])
def test_gptq_rejects_out_features_qzeros_cannot_hold(bits, out_f):
    _raises_one_line(pack_gptq, *_ok(out_f, 64, bits), bits, -1, match=f"out_features {out_f}")


def test_gptq_rejects_zero_point_zero():
    codes, zeros, scales = _ok(32, 32, 4)
    zeros[3, 0] = 0
    _raises_one_line(pack_gptq, codes, zeros, scales, 4, -1, match="zero point 0")


def test_rejects_out_of_range_and_wrong_shapes():
    codes, zeros, scales = _ok(32, 64, 4, group_size=32)
    bad = codes.copy()
    bad[0, 0] = 16
    _raises_one_line(pack_gptq, bad, zeros, scales, 4, 32, match="codes")
    _raises_one_line(pack_awq, bad, zeros, scales, 32, match="codes")
    _raises_one_line(pack_gptq, codes, zeros[:, :1], scales, 4, 32, match="zeros has shape")
    _raises_one_line(pack_gptq, codes, zeros, scales[:, :1], 4, 32, match="scales has shape")
    _raises_one_line(pack_gptq, codes, zeros, scales, 4, 48, match="group_size 48")
    _raises_one_line(pack_gptq, codes.astype(np.float32), zeros, scales, 4, 32, match="integer")
    _raises_one_line(pack_gptq, codes, zeros, np.full_like(scales, 1e6), 4, 32, match="float16")


def test_awq_rejects_bits_and_out_features():
    _raises_one_line(pack_awq, *_ok(32, 32, 4, zero=0), -1, bits=3, match="4-bit")
    _raises_one_line(unpack_awq, pack_awq(*_ok(32, 32, 4, zero=0), -1), -1, bits=8, match="4-bit")
    _raises_one_line(pack_awq, *_ok(12, 32, 4, zero=0), -1, match="out_features 12")


def test_unpack_rejects_inconsistent_tensors():
    t = pack_gptq(*_ok(32, 256, 4, group_size=128), 4, 128)
    _raises_one_line(unpack_gptq, t, 4, 64, match="do not match")
    _raises_one_line(unpack_gptq, {k: v for k, v in t.items() if k != "qzeros"}, 4, 128, match="qzeros")
    _raises_one_line(unpack_gptq, {**t, "qweight": t["qweight"].astype(np.float32)}, 4, 128, match="int32")
    _raises_one_line(unpack_gptq, {**t, "g_idx": t["g_idx"][::-1].copy()}, 4, 128, match="g_idx")
    a = pack_awq(*_ok(32, 256, 4, group_size=128, zero=0), 128)
    _raises_one_line(unpack_awq, a, 64, match="do not match")
    _raises_one_line(unpack_awq, a, 96, match="group_size 96")
