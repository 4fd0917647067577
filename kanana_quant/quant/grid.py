"""The integer grid every quantizer shares: w ≈ scale · (q − zero), q ∈ [0, 2^bits − 1], one (scale, zero)
per output row and group of `group_size` input columns.

Scales are rounded to fp16 before any weight is rounded, because fp16 is what the checkpoint stores: the
saved weights dequantize to exactly the values the quantizer (and GPTQ's error feedback) worked with.
Symmetric grids fix zero = 2^(bits−1), the GPTQ convention; the scale may still place the extreme weight
on the lowest level (−2^(bits−1)), as llama.cpp's Q4_0 does, which the search below considers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kanana_quant.errors import KananaQuantError
from kanana_quant.quant.packing import GPTQ_BITS, PER_CHANNEL, group_width

SUPPORTED_BITS = GPTQ_BITS
SUPPORTED_GROUPS = (32, 64, 128, PER_CHANNEL)
# Candidate shrink factors of the range for the clipping search (1.0 = min/max, no clipping).
CLIP_GRID = tuple(1.0 - 0.01 * i for i in range(0, 50, 2))


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # -1 = per-channel
    sym: bool = True

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise KananaQuantError(f"--bits {self.bits} is not supported; choose one of {SUPPORTED_BITS}")
        if self.group_size not in SUPPORTED_GROUPS:
            raise KananaQuantError(f"--group-size {self.group_size} is not supported; choose 32, 64, 128 "
                                   "or -1 (per-channel)")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def groups(self, in_features: int) -> int:
        return in_features // group_width(self.group_size, in_features)

    def group_width(self, in_features: int) -> int:
        return group_width(self.group_size, in_features)

    def check(self, in_features: int, name: str) -> None:
        """Fail before any work when the group size does not divide a row."""
        if in_features % group_width(self.group_size, in_features):
            raise KananaQuantError(f"--group-size {self.group_size} does not divide the {in_features} input "
                                   f"columns of {name}; choose a group size that divides it or -1")


def to_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(x.dtype)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes of w [rows, cols] on the grid of per-row scale/zero [rows, 1]."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def _range_params(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) [rows, 1] covering [xmin ≤ 0, xmax ≥ 0] (GPTQ's min/max rule)."""
    maxq = spec.maxq
    if spec.sym:
        scale = 2 * torch.maximum(xmax, -xmin) / maxq
    else:
        scale = (xmax - xmin) / maxq
    # Check after rounding: a range below fp16's smallest subnormal would otherwise store a zero scale.
    scale = to_fp16(scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if spec.sym:
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    # Zero ≥ 1: GPTQ's v1 layout stores zero − 1, and loaders disagree on how to read back a stored −1.
    return scale, torch.clamp(torch.round(-xmin / scale), 1, maxq)


def _extreme_params(extreme: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric grid whose lowest level −2^(bits−1) lands on the row's largest-magnitude weight (sign
    taken into account), as llama.cpp does: one more usable level than absmax / (2^(bits−1) − 0.5)."""
    half = (spec.maxq + 1) // 2
    scale = to_fp16(-extreme / half)
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))
    return scale, torch.full_like(scale, half)


def fit_params(w: torch.Tensor, spec: QuantSpec, search: bool = True,
               importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for one group of columns w [..., rows, cols] (leading dims: independent groups,
    `importance` then [..., 1, cols]).

    With `search`, try range shrink factors (clipping) — and for symmetric grids both scale signs — and keep,
    per row, the one with the least squared error, weighted per column by `importance` (e.g. the diagonal
    of the GPTQ Hessian, i.e. mean squared activations) when given.
    """
    xmin = torch.clamp(w.min(dim=-1, keepdim=True).values, max=0)
    xmax = torch.clamp(w.max(dim=-1, keepdim=True).values, min=0)
    scale, zero = _range_params(xmin, xmax, spec)
    if not search:
        return scale, zero
    weight = torch.ones(w.shape[-1], dtype=w.dtype, device=w.device) if importance is None else importance
    extreme = torch.gather(w, -1, w.abs().argmax(dim=-1, keepdim=True))
    best = torch.full((*w.shape[:-1], 1), float("inf"), dtype=w.dtype, device=w.device)
    buf = torch.empty_like(w)  # one scratch tensor: fresh temporaries per candidate cost more than the math
    for shrink in CLIP_GRID:
        candidates = [_range_params(xmin * shrink, xmax * shrink, spec)]
        if spec.sym:
            candidates.append(_extreme_params(extreme * shrink, spec))
        for s, z in candidates:
            # weight · (s·(clamp(round(w/s) + z) − z) − w)², the same operations as dequantize(quantize(·))
            torch.div(w, s, out=buf).round_().add_(z).clamp_(0, spec.maxq).sub_(z).mul_(s).sub_(w)
            err = buf.square_().mul_(weight).sum(dim=-1, keepdim=True)
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def quantize_rtn(w: torch.Tensor, spec: QuantSpec, search: bool = True,
                 importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of a whole weight [out, in]: returns codes [out, in], scales and zeros [out, groups]."""
    width = spec.group_width(w.shape[1])
    codes, scales, zeros = [], [], []
    for start in range(0, w.shape[1], width):
        cols = slice(start, start + width)
        s, z = fit_params(w[:, cols], spec, search, None if importance is None else importance[cols])
        codes.append(quantize(w[:, cols], s, z, spec.maxq))
        scales.append(s)
        zeros.append(z)
    return torch.cat(codes, 1), torch.cat(scales, 1), torch.cat(zeros, 1)
