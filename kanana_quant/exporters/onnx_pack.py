"""Integer codes in onnxruntime's MatMulNBits / QMoE layouts (checked against onnxruntime itself in
tests/test_onnx_export.py).

Both ops take, per output row n, the codes of the K inputs in blocks of `block_size`, packed low bits first
(two 4-bit codes per byte: even k in the low nibble), `scales` [N, K / block] and optional zero points packed
the same way along the block axis (default 2^(bits-1) when absent); W[n, k] = scale · (code − zero).

Our checkpoints' grids carry over exactly: group g ∈ {32, 64, 128} becomes block g; a per-channel group
becomes the largest power-of-two block dividing K with its scale and zero repeated; 2- and 3-bit codes are
stored as 4-bit codes (the same integers, so the same weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kanana_quant.quant.packing import PER_CHANNEL, group_width

BLOCKS = (256, 128, 64, 32, 16)


@dataclass
class NBits:
    """One quantized [N, K] matrix in MatMulNBits layout."""

    packed: np.ndarray  # uint8 [N, K / block, block * bits / 8]
    scales: np.ndarray  # float32 [N, K / block]
    zeros: np.ndarray | None  # uint8 [N, ceil(blocks * bits / 8)], None = the default 2^(bits-1)
    bits: int
    block: int

    @property
    def shape(self) -> tuple[int, int]:
        n, kb, blob = self.packed.shape
        return n, kb * blob * 8 // self.bits


def storage_bits(bits: int) -> int:
    """MatMulNBits width that holds `bits`-bit codes exactly (its CPU kernels serve 4 and 8)."""
    return 8 if bits > 4 else 4


def block_for(cols: int, group_size: int) -> int | None:
    """The MatMulNBits block for a grid of `group_size` (-1 = per-channel) over `cols` inputs, or None."""
    if group_size != PER_CHANNEL:
        return group_size if group_size in BLOCKS and cols % group_size == 0 else None
    return next((b for b in BLOCKS if cols % b == 0), None)


def pack_low_first(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of uint8 values < 2^bits, low bits first (its length padded to whole bytes)."""
    values = np.asarray(values, dtype=np.uint8)
    if bits == 8:
        return np.ascontiguousarray(values)
    per = 8 // bits
    pad = (-values.shape[-1]) % per
    if pad:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], pad), np.uint8)], axis=-1)
    runs = values.reshape(*values.shape[:-1], -1, per)
    out = np.zeros(runs.shape[:-1], np.uint8)
    for i in range(per):
        out |= runs[..., i] << np.uint8(bits * i)
    return out


def unpack_low_first(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    if bits == 8:
        return np.asarray(packed, dtype=np.uint8)[..., :length]
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    out = np.stack([(packed >> np.uint8(bits * i)) & mask for i in range(per)], axis=-1)
    return out.reshape(*packed.shape[:-1], -1)[..., :length]


def from_codes(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, group_size: int) -> NBits | None:
    """codes uint8 [N, K], scales / zeros [N, groups] → MatMulNBits tensors, or None when no block fits."""
    n, k = codes.shape
    block = block_for(k, group_size)
    if block is None:
        return None
    width = group_width(group_size, k)
    repeat = width // block
    scales = np.repeat(np.asarray(scales, np.float32), repeat, axis=1)
    zeros = np.repeat(np.asarray(zeros, np.uint8), repeat, axis=1)
    sbits = storage_bits(bits)
    packed = pack_low_first(codes, sbits).reshape(n, k // block, block * sbits // 8)
    default = zeros.size and np.all(zeros == 1 << (sbits - 1))
    return NBits(packed, np.ascontiguousarray(scales), None if default else pack_low_first(zeros, sbits), sbits,
                 block)


def concat_rows(qs: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes, scales and zeros of several QTensors with one grid, stacked along the output rows (exact: rows
    are independent)."""
    return (np.concatenate([q.codes for q in qs]), np.concatenate([q.scales for q in qs]),
            np.concatenate([q.zeros for q in qs]))


# The widest block an lm_head we quantize ourselves gets, per bits. MatMulNBits reads 8-bit codes faster the
# wider the block (2 threads, a [16032, 2048] head slice, accuracy_level 4: 84-89 µs per million weights at
# block 32, 65-67 at 128, 62 at 256), and 8 bits lose nothing measurable to a wider block (SmolLM2, RTN 4-bit
# layers, 24 x 512 held-out tokens: PPL en/ko 40.84/8.497 float head, 40.93/8.493 q8 block 32, 40.87/8.480
# q8 block 64, its widest). 4-bit codes keep the narrow block for quality.
HEAD_BLOCKS = {8: 256, 4: 32}


def head_block(cols: int, bits: int) -> int:
    """The widest MatMulNBits block ≤ HEAD_BLOCKS[bits] that divides `cols`."""
    return max((b for b in BLOCKS if b <= HEAD_BLOCKS[bits] and cols % b == 0), default=cols)


def quantize_rtn(w: np.ndarray, bits: int, block: int | None = None) -> NBits:
    """Symmetric round-to-nearest of a float [N, K] matrix (for a float lm_head asked to be 8- or 4-bit), in
    blocks of `block` inputs (default head_block)."""
    n, k = w.shape
    block = block or head_block(k, bits)
    if k % block:
        block = block_for(k, -1) or k
    half = 1 << (bits - 1)
    out_codes = np.empty((n, k), np.uint8)
    out_scales = np.empty((n, k // block), np.float32)
    for start in range(0, n, 4096):  # bounded temporaries for a 128K-row vocabulary
        rows = np.asarray(w[start:start + 4096], np.float32).reshape(-1, k // block, block)
        amax = np.abs(rows).max(axis=-1)
        scale = (amax / (half - 1)).astype(np.float16).astype(np.float32)
        scale[scale == 0] = 1.0
        codes = np.clip(np.rint(rows / scale[..., None]), -half, half - 1) + half
        out_codes[start:start + 4096] = codes.reshape(-1, k).astype(np.uint8)
        out_scales[start:start + 4096] = scale
    zeros = np.full(out_scales.shape, half, np.uint8)
    return from_codes(out_codes, out_scales, zeros, bits, block)


def dequantize(nb: NBits) -> np.ndarray:
    """Float weights of an NBits matrix (tests and the exact-float fallbacks)."""
    n, k = nb.shape
    kb = k // nb.block
    codes = unpack_low_first(nb.packed.reshape(n, -1), nb.bits, k).reshape(n, kb, nb.block).astype(np.float32)
    zeros = (np.full((n, kb), 1 << (nb.bits - 1), np.float32) if nb.zeros is None
             else unpack_low_first(nb.zeros, nb.bits, kb).astype(np.float32))
    return ((codes - zeros[..., None]) * nb.scales[..., None]).reshape(n, k)
