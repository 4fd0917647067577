"""GGUF tensor types as GPTQ grids.

A type's block parameters (scales, K-quant sub-block scales and minimums) are fitted to the layer's weights
up front, weighted by the calibration importance diag(H) as llama.cpp's imatrix quantization weights them
(the very searches of gguf/blocks.py, which reproduce llama.cpp's imatrix quantizers byte for byte); GPTQ
then chooses every code on that fixed grid while it pushes rounding errors onto later columns; the codes and
the parameters pack into the type's bytes unchanged. So the file llama.cpp runs holds exactly the weights
GPTQ optimised.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from kanana_quant.gguf import blocks
from kanana_quant.quant.gptq import ColumnGrid
from kanana_quant.quant.grid import fit_params

# A zero sub-block scale stores the minimum alone; GPTQ's grid needs a non-zero step, so it gets one this
# small: every code then dequantizes to the minimum, as in the packed block.
_TINY_STEP = 1e-20
LEGACY = {T.Q4_0: (15, 32), T.Q5_0: (31, 32), T.Q8_0: (254, 32)}  # maxq, block; zero = (maxq + 1) // 2


@dataclass
class GGMLFit:
    grid: ColumnGrid
    pack: Callable[[np.ndarray], np.ndarray]  # codes [out, in] → the type's bytes [out, row bytes]


def _per_column(x: np.ndarray, width: int) -> torch.Tensor:
    """[rows, n_blocks, ...] per-block values → [rows, cols], each repeated over its block's columns."""
    x = x.reshape(x.shape[0], -1).astype(np.float32)
    return torch.from_numpy(np.repeat(x, width, axis=1))


def _nonzero(step: np.ndarray) -> np.ndarray:
    return np.where(step == 0, np.float32(_TINY_STEP), step.astype(np.float32))


def _legacy(w: torch.Tensor, importance: torch.Tensor, qtype: T) -> GGMLFit:
    """Q4_0 / Q5_0 / Q8_0: w = d·(q − zero) per 32, d from the importance-weighted clipping search of our
    integer grids. (llama.cpp's own imatrix search for Q4_0, blocks.fit_q4_0, tried as GPTQ's grid on SmolLM2,
    gave ΔPPL 1.53x / 2.82x llama.cpp+imatrix's in English / Korean in bench/gguf_quality.py, where an earlier
    version of this search had measured 1.36x / 1.10x; per tensor, bench/gptq_heldout.py finds the two grids
    within a few percent of each other.)"""
    maxq, block = LEGACY[qtype]
    grid = SimpleNamespace(maxq=maxq, sym=True)
    rows, blocks_per_row = w.shape[0], w.shape[1] // block
    # every block's search at once ([blocks, rows, block]): one call per block cost half of a layer's time
    scales = fit_params(w.reshape(rows, blocks_per_row, block).transpose(0, 1).contiguous(), grid, True,
                        importance.reshape(blocks_per_row, 1, block))[0].squeeze(-1).T.contiguous()
    zero = (maxq + 1) // 2
    pack = {T.Q4_0: blocks.pack_q4_0, T.Q5_0: blocks.pack_q5_0,
            T.Q8_0: lambda codes, s: blocks.pack_q8_0(codes.astype(np.int16) - zero, s)}[qtype]
    s = scales.numpy()
    return GGMLFit(ColumnGrid(scales.repeat_interleave(block, 1), torch.full_like(w, zero), maxq),
                   lambda codes: pack(codes, s))


def _legacy_affine(w: torch.Tensor, importance: torch.Tensor, qtype: T) -> GGMLFit:
    """Q4_1 / Q5_1: w = d·q + m per 32, d and m from llama.cpp's imatrix search (make_qkx3_quants)."""
    fit, pack, maxq = ((blocks.fit_q4_1, blocks.pack_q4_1, 15) if qtype == T.Q4_1
                       else (blocks.fit_q5_1, blocks.pack_q5_1, 31))
    f = fit(w.numpy(), importance.numpy())
    d, m = f.d.astype(np.float32), f.m.astype(np.float32)
    step = _nonzero(d)
    grid = ColumnGrid(_per_column(step, 32), _per_column(-m / step, 32), maxq)
    return GGMLFit(grid, lambda codes: pack(codes, f.d, f.m))


def _k_affine(w: torch.Tensor, importance: torch.Tensor, qtype: T) -> GGMLFit:
    fit, pack, maxq, sub = {T.Q2_K: (blocks.fit_q2_k, blocks.pack_q2_k, 3, 16),
                            T.Q4_K: (blocks.fit_q4_k, blocks.pack_q4_k, 15, 32),
                            T.Q5_K: (blocks.fit_q5_k, blocks.pack_q5_k, 31, 32)}[qtype]
    f = fit(w.numpy(), importance.numpy())
    step = _nonzero(f.d.astype(np.float32)[..., None] * f.sc)  # [rows, n_super, sub-blocks]
    low = f.dmin.astype(np.float32)[..., None] * f.m
    grid = ColumnGrid(_per_column(step, sub), _per_column(low / step, sub), maxq)
    return GGMLFit(grid, lambda codes: pack(f._replace(q=codes.reshape(f.q.shape))))


def _k_sym(w: torch.Tensor, importance: torch.Tensor, qtype: T) -> GGMLFit:
    """Q3_K (w = d·sc·(q − 4), 16 per sub-block) and Q6_K (w = d·sc·(q − 32))."""
    fit, pack, maxq = ((blocks.fit_q3_k, blocks.pack_q3_k, 7) if qtype == T.Q3_K
                       else (blocks.fit_q6_k, blocks.pack_q6_k, 63))
    f = fit(w.numpy(), importance.numpy())
    step = _nonzero(f.d.astype(np.float32)[..., None] * f.sc.astype(np.float32))  # sub-blocks of 16
    grid = ColumnGrid(_per_column(step, 16), torch.full_like(w, float((maxq + 1) // 2)), maxq)
    return GGMLFit(grid, lambda codes: pack(f._replace(q=codes.reshape(f.q.shape))))


_LEVELS = torch.from_numpy(blocks.KVALUES.astype(np.float32))


def _iq4(w: torch.Tensor, importance: torch.Tensor, qtype: T) -> GGMLFit:
    """IQ4_NL (w = d·v[q] per 32) and IQ4_XS (w = d·sc·v[q] per 32 of a 256-block), v the 16 IQ4 levels."""
    nl = qtype == T.IQ4_NL
    f = (blocks.fit_iq4_nl if nl else blocks.fit_iq4_xs)(w.numpy(), importance.numpy())
    d = f.d.astype(np.float32)
    step = _nonzero(d if nl else d[..., None] * f.sc.astype(np.float32))
    grid = ColumnGrid(_per_column(step, 32), torch.zeros_like(w), 15, _LEVELS.clone())
    pack = blocks.pack_iq4_nl if nl else blocks.pack_iq4_xs
    return GGMLFit(grid, lambda codes: pack(f._replace(q=codes.reshape(f.q.shape))))


_FITTERS = {T.Q4_1: _legacy_affine, T.Q5_1: _legacy_affine, T.Q2_K: _k_affine, T.Q4_K: _k_affine,
            T.Q5_K: _k_affine, T.Q3_K: _k_sym, T.Q6_K: _k_sym, T.IQ4_NL: _iq4, T.IQ4_XS: _iq4}


def fitter(qtype: T) -> Callable[[torch.Tensor, torch.Tensor], GGMLFit] | None:
    """The grid fitter for a GGML type, or None for types GPTQ does not target (floats)."""
    if qtype in LEGACY:
        return lambda w, imp: _legacy(w, imp, qtype)
    if qtype in _FITTERS:
        return lambda w, imp: _FITTERS[qtype](w, imp, qtype)
    return None
