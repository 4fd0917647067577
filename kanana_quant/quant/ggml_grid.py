"""GGUF tensor types as GPTQ grids.

A type's block parameters (scales, K-quant sub-block scales and minimums) are fitted to the layer's weights
up front, weighted by the calibration importance diag(H) as llama.cpp's imatrix quantization weights them;
GPTQ then chooses every code on that fixed grid while it pushes rounding errors onto later columns; the codes
and the parameters pack into the type's bytes unchanged. So the file llama.cpp runs holds exactly the
weights GPTQ optimised.
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


def _legacy(w: torch.Tensor, importance: torch.Tensor, qtype: T) -> GGMLFit:
    maxq, block = LEGACY[qtype]
    grid = SimpleNamespace(maxq=maxq, sym=True)
    scales = torch.cat([fit_params(w[:, c:c + block], grid, True, importance[c:c + block])[0]
                        for c in range(0, w.shape[1], block)], 1)
    zero = (maxq + 1) // 2
    pack = {T.Q4_0: blocks.pack_q4_0, T.Q5_0: blocks.pack_q5_0,
            T.Q8_0: lambda codes, s: blocks.pack_q8_0(codes.astype(np.int16) - zero, s)}[qtype]
    s = scales.numpy()
    return GGMLFit(ColumnGrid(scales.repeat_interleave(block, 1), torch.full_like(w, zero), maxq),
                   lambda codes: pack(codes, s))


def _k_affine(w: torch.Tensor, importance: torch.Tensor, qtype: T) -> GGMLFit:
    fit, pack, maxq = ((blocks.fit_q4_k, blocks.pack_q4_k, 15) if qtype == T.Q4_K
                       else (blocks.fit_q5_k, blocks.pack_q5_k, 31))
    f = fit(w.numpy(), importance.numpy())
    step = f.d.astype(np.float32)[..., None] * f.sc  # [rows, n_super, 8]: sub-blocks of 32
    low = f.dmin.astype(np.float32)[..., None] * f.m
    step = np.where(step == 0, np.float32(_TINY_STEP), step)
    grid = ColumnGrid(_per_column(step, 32), _per_column(low / step, 32), maxq)
    return GGMLFit(grid, lambda codes: pack(f._replace(q=codes.reshape(f.q.shape))))


def _q6_k(w: torch.Tensor, importance: torch.Tensor) -> GGMLFit:
    f = blocks.fit_q6_k(w.numpy(), importance.numpy())
    step = f.d.astype(np.float32)[..., None] * f.sc.astype(np.float32)  # sub-blocks of 16
    step = np.where(step == 0, np.float32(_TINY_STEP), step)
    grid = ColumnGrid(_per_column(step, 16), torch.full_like(w, 32.0), 63)
    return GGMLFit(grid, lambda codes: blocks.pack_q6_k(f._replace(q=codes.reshape(f.q.shape))))


def fitter(qtype: T) -> Callable[[torch.Tensor, torch.Tensor], GGMLFit] | None:
    """The grid fitter for a GGML type, or None for types GPTQ does not target (floats, Q4_1, Q5_1)."""
    if qtype in LEGACY:
        return lambda w, imp: _legacy(w, imp, qtype)
    if qtype in (T.Q4_K, T.Q5_K):
        return lambda w, imp: _k_affine(w, imp, qtype)
    if qtype == T.Q6_K:
        return _q6_k
    return None
