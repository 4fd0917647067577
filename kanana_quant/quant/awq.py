"""AWQ (Lin et al. 2023, activation-aware weight quantization) for one Llama decoder layer, as plain torch
functions on weight tensors and captured input activations.

A few input channels of an LLM layer carry activations tens of times larger than the rest, so the rounding
error of their weights dominates the output error. AWQ multiplies those weight columns by s > 1 before
round-to-nearest (their relative rounding error shrinks by s) and divides the activations by s, which costs
nothing at inference because the division is folded into the op that produces the activations. The scale is
searched on a 1-D grid s = x_mean^α / w_mean^(1−α); then each (row, group) range is clipped on a 1-D grid.

Usage per layer (x_* are the captured inputs of each linear, all on the float model):
    s = search_scales(x_attn, [q, k, v], spec);  fold_scales(input_layernorm, [q, k, v], s)
    s = search_scales(x_mlp, [gate, up], spec);  fold_scales(post_attention_layernorm, [gate, up], s)
    s = search_scales(x_down, [down], spec);     fold_scales(up, [down], s)
    s = search_scales(x_o, [o], spec);           fold_scales(v, [o], s)   # only without GQA, see fold_scales
then clip with search_clip(x / s, w, spec), passing the input divided by the scale folded into its producer;
AWQ skips clipping q and k, whose error is amplified by the q·k product that a per-linear loss cannot see.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from kanana_quant.quant.grid import QuantSpec, dequantize, fit_params, quantize

Forward = Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]


def _rtn(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Dequantized plain min/max RTN of w [..., in]; fit_params is per row, so one call covers all groups."""
    width = spec.group_width(w.shape[-1])
    g = w.reshape(-1, width)
    scale, zero = fit_params(g, spec, search=False)
    return dequantize(quantize(g, scale, zero, spec.maxq), scale, zero).reshape(w.shape)


def _subsample(x: torch.Tensor, n: int) -> torch.Tensor:
    """Evenly strided tokens: calibration batches are concatenated sequences, so a stride spans them all."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.shape[0] <= n else x[torch.linspace(0, x.shape[0] - 1, n).long()]


def search_sequences(available: int, tokens: int, seq_len: int) -> list[int]:
    """Indices of the calibration sequences the scale search reads: enough for `tokens`, spread evenly over
    all `available` ones. Calibration windows start at random offsets of the document stream, so the first
    few can all land in one language or genre (with the default seed, 5 of the first 8 built-in windows are
    Korean). Measured on SmolLM2 (4-bit g64, 8 of 32 sequences): English ΔPPL 0.91x RTN's with the first
    eight, 0.67x with eight spread ones."""
    wanted = min(available, max(1, math.ceil(tokens / seq_len)))
    return sorted({round(i * (available - 1) / max(1, wanted - 1)) for i in range(wanted)})


def _linear(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x @ w.T for w in weights], dim=1)


@torch.no_grad()
def search_scales(x: torch.Tensor, weights: list[torch.Tensor], spec: QuantSpec, n_grid: int = 20,
                  duo_scaling: bool = True, forward: Forward | None = None,
                  max_tokens: int = 4096) -> torch.Tensor:
    """Per-input-channel scale s [in] for the linears `weights` (each [out_i, in]) that all read x [.., in].

    `forward(x, weights)` may replace the concatenated linear outputs as the compared function (e.g. a
    whole attention or MLP block); it is called with the float weights and with Q(W·s)/s.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    ws = [w.float() for w in weights]
    spec.check(x.shape[1], "the AWQ scale search")
    for w in ws:
        if w.shape[1] != x.shape[1]:
            raise ValueError(f"weight {tuple(w.shape)} does not read {x.shape[1]} input channels")
    x_mean = x.abs().mean(0)
    # Weight magnitude relative to its quantization group's max: what decides a column's rounding error.
    width = spec.group_width(x.shape[1])
    cat = torch.cat(ws).abs().reshape(-1, width)
    w_mean = (cat / (cat.amax(1, keepdim=True) + 1e-6)).reshape(-1, x.shape[1]).mean(0)

    fwd = forward or _linear
    xs = _subsample(x, max_tokens)
    ref = fwd(xs, ws)

    def loss(s: torch.Tensor) -> float:
        return (fwd(xs, [_rtn(w * s, spec) / s for w in ws]) - ref).pow(2).sum().item()

    # s = 1 is a candidate of its own: with duo scaling α = 0 is not the identity, and AWQ must never be
    # worse than plain RTN on the data it was fitted to.
    best_s = torch.ones_like(x_mean)
    best = loss(best_s)
    for k in range(n_grid):
        a = k / n_grid
        s = x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4) if duo_scaling else x_mean.pow(a)
        s = s.clamp(min=1e-4)
        # Centring on the geometric mean keeps W·s and the folded norm weights near their float range.
        s = torch.nan_to_num(s / (s.max() * s.min()).sqrt(), nan=1.0, posinf=1.0).clamp(1e-4, 1e4)
        err = loss(s)
        if err < best:  # a NaN loss (degenerate grid) is never chosen
            best, best_s = err, s
    return best_s


@torch.no_grad()
def search_clip(x: torch.Tensor, w: torch.Tensor, spec: QuantSpec, n_grid: int = 20, max_shrink: float = 0.5,
                n_tokens: int = 512, budget: int = 1 << 22) -> torch.Tensor:
    """w [out, in] with each (row, group) range shrunk by the factor 1 − k/n_grid (k < max_shrink·n_grid)
    that minimises that group's share of the output error on `n_tokens` sampled rows of x [.., in].

    Symmetric grids shrink max|w|; asymmetric ones shrink [min, max]. k = 0 (no clipping) is always a
    candidate and ties keep it, so no group's error grows. `budget` bounds the floats of the per-batch
    [rows, tokens, groups] error tensor.
    """
    out_f, in_f = w.shape
    spec.check(in_f, "the AWQ clip search")
    width = spec.group_width(in_f)
    groups = in_f // width
    xg = _subsample(x, n_tokens).float().reshape(-1, groups, width).transpose(0, 1).contiguous()  # [g, t, c]
    wf = w.float().reshape(out_f, groups, width)
    rows = max(1, budget // (xg.shape[1] * groups + in_f))
    factors = [1 - k / n_grid for k in range(n_grid) if k < max_shrink * n_grid]
    out = torch.empty_like(wf)
    for r in range(0, out_f, rows):
        wb = wf[r:r + rows]
        hi, lo = wb.amax(-1, keepdim=True), wb.amin(-1, keepdim=True)
        if spec.sym:
            hi = torch.maximum(hi, -lo)
            lo = -hi
        best_err = torch.full_like(hi, float("inf"))
        best_f = torch.ones_like(hi)
        for f in factors:
            diff = _rtn(torch.clamp(wb, lo * f, hi * f), spec) - wb
            # bmm over groups: einsum picks a path that is ~20× slower on CPU here.
            err = torch.bmm(xg, diff.permute(1, 2, 0)).pow(2).mean(1).T.unsqueeze(-1)  # [b, g, 1]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_f = torch.where(better, torch.full_like(best_f, f), best_f)
        out[r:r + rows] = torch.clamp(wb, lo * best_f, hi * best_f)
    return out.reshape(out_f, in_f).to(w.dtype)


@torch.no_grad()
def fold_scales(prev: torch.Tensor, nexts: list[torch.Tensor], s: torch.Tensor) -> None:
    """In place: prev's output channels ÷ s, nexts' input columns × s; the float function is unchanged.

    prev is an RMSNorm weight [in] or a linear weight [in, *] whose rows produce the nexts' inputs. The
    pairs of a Llama layer:
      input_layernorm          → q_proj, k_proj, v_proj
      post_attention_layernorm → gate_proj, up_proj
      up_proj                  → down_proj   (silu(gate)·up is linear in up's output channel)
      v_proj                   → o_proj      only when v and o have the same shape: attention mixes
                                             tokens, not channels, so it commutes with a per-channel s;
                                             with GQA a v channel feeds several o columns, and AutoAWQ
                                             (like llm-awq) skips the pair.
    Pass nexts=[] to fold s into prev alone when the nexts already carry it.
    """
    if prev.shape[0] != s.numel() or any(n.dim() != 2 or n.shape[1] != s.numel() for n in nexts):
        raise ValueError(f"scale of {s.numel()} channels does not fit prev {tuple(prev.shape)} / nexts "
                         f"{[tuple(n.shape) for n in nexts]} (GQA v→o is not foldable)")
    prev.div_(s.to(prev.dtype).reshape(-1, *([1] * (prev.dim() - 1))))
    for n in nexts:
        n.mul_(s.to(n.dtype).reshape(1, -1))
