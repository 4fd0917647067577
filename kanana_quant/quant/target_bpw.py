"""Mixed precision to a size target (`quantize --format gguf --target-bpw B`): per-tensor GGML types chosen so
the decoder layers' linears average B bits per weight, spending bits where the sensitivity is highest.

A pre-pass streams the float model one layer at a time over the calibration windows and, per linear, takes the
importance diag(H) (mean squared input per column) and each candidate type's error Σ_c diag(H)_c Σ_r (w − q)²
with q llama.cpp's imatrix-weighted rounding on that type (gguf/blocks.py): the calibration output error that
the type costs, to first order. The types then minimise Σ error + λ · bytes over all tensors, with λ found by
bisection so the bytes meet the target: at the optimum every tensor's marginal error per byte is equal, so bits
go where the Hessian-weighted error per byte is highest. GPTQ then runs on the chosen grids as usual. The
embedding and the output tensor keep the base mix's types and are not counted in B.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize
from gguf import GGMLQuantizationType as T

from kanana_quant import names
from kanana_quant.errors import KananaQuantError
from kanana_quant.gguf import blocks
from kanana_quant.layers_torch import TorchLayer
from kanana_quant.loader import LoadedModel
from kanana_quant.quant.options import QuantOptions

# candidate types by row width, cheapest first (bits per weight: 2.625, 3.4375, 4.25, 4.5, 5.5, 6.5625, 8.5)
LADDER_256 = (T.Q2_K, T.Q3_K, T.IQ4_XS, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)
LADDER_32 = (T.IQ4_NL, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)  # rows not whole 256-blocks (4.5, 5, 5.5, 6, 8.5)
ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def bits_per_weight(qtype: T) -> float:
    block, size = GGML_QUANT_SIZES[qtype]
    return 8 * size / block


def ladder(cols: int) -> tuple[T, ...]:
    if cols % 256 == 0:
        return LADDER_256
    if cols % 32 == 0:
        return LADDER_32
    raise KananaQuantError(f"--target-bpw: rows of {cols} columns are not whole 32-blocks")


def check_target(target: float, cfg) -> None:
    """Refuse a target outside the average the layer linears can reach: every tensor at its ladder's cheapest
    type, or every one at its dearest. (A model whose rows are partly not whole 256-blocks, such as SmolLM2's
    576-wide ones, still reaches below 4.5 bits through the tensors that are.)"""
    if cfg.moe:
        raise KananaQuantError("--target-bpw supports dense models (MoE experts are stacked per type)")
    shapes = [names.tensor_shape(cfg, f"layers.0.{role}") for role in ROLES]
    total = sum(rows * cols for rows, cols in shapes)

    def average(pick) -> float:
        return sum(rows * cols * pick(bits_per_weight(t) for t in ladder(cols)) for rows, cols in shapes) / total

    lo, hi = average(min), average(max)
    if not lo <= target <= hi:
        raise KananaQuantError(f"--target-bpw {target:g} is outside what this model's types reach "
                               f"({lo:.3f} to {hi:.3f} bits per weight over the layer linears)")


def _inputs(layer: TorchLayer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each linear's calibration input in the float layer (rows: tokens)."""
    a = layer.attention_input(x)
    ctx = layer.attention_context(a)
    m = layer.mlp_input(layer.after_attention(x, ctx))
    flat = {"q": a, "o": ctx, "gate": m, "down": layer.swiglu_hidden(m)}
    return {k: v.reshape(-1, v.shape[-1]) for k, v in flat.items()}


def sensitivities(model: LoadedModel, opts: QuantOptions, on_layer=None) -> dict[str, dict[T, float]]:
    """Per canonical linear name, each candidate type's importance-weighted squared error."""
    from kanana_quant.calib import calibration_ids

    cfg = model.config
    ids = calibration_ids(model.tokenizer, opts.calib, opts.samples, opts.seq_len, opts.seed,
                          encoder=model.config.embedding is not None)
    embed = model.weights.get("embed")
    acts = torch.from_numpy(np.stack([embed[i] for i in ids]).astype(np.float32))
    del embed
    source = {"q": "q", "k": "q", "v": "q", "o": "o", "gate": "gate", "up": "gate", "down": "down"}
    errors: dict[str, dict[T, float]] = {}
    # numpy releases the GIL in its array loops, so the candidate types' roundings run on every core
    with torch.inference_mode(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for i in range(cfg.num_layers):
            w = {r: torch.from_numpy(a) for r, a in model.weights.layer(i).items()}
            model.weights.close()
            layer = TorchLayer(cfg, w, opts.seq_len)
            sq = {}
            for b in range(0, len(acts), opts.batch):
                for k, v in _inputs(layer, acts[b:b + opts.batch]).items():
                    sq[k] = sq.get(k, 0) + (v * v).sum(0)
                acts[b:b + opts.batch] = layer.forward(acts[b:b + opts.batch])
            jobs = {}
            for role in ROLES:
                imp = (sq[source[role]] / (len(acts) * opts.seq_len)).numpy().astype(np.float32)
                weight = w[role].numpy()
                jobs[f"layers.{i}.{role}"] = {t: pool.submit(_error, weight, imp, t) for t in ladder(weight.shape[1])}
            errors.update({n: {t: job.result() for t, job in by_type.items()} for n, by_type in jobs.items()})
            if on_layer:
                on_layer(i)
    return errors


def _error(weight: np.ndarray, imp: np.ndarray, qtype: T) -> float:
    data = blocks.quantize(weight, qtype, imp if qtype in blocks.TAKES_IMPORTANCE else None)
    with np.errstate(all="ignore"):
        return float((imp * (dequantize(data, qtype) - weight) ** 2).sum())


def allocate(errors: dict[str, dict[T, float]], sizes: dict[str, int], target: float) -> dict[str, T]:
    """Types minimising Σ error + λ·bits with the average bits per weight (over `sizes`' weights) ≤ target."""
    total = sum(sizes.values())

    def pick(lam: float) -> dict[str, T]:
        return {n: min(errs, key=lambda t: (errs[t] + lam * bits_per_weight(t) * sizes[n], bits_per_weight(t)))
                for n, errs in errors.items()}

    def bpw(choice: dict[str, T]) -> float:
        return sum(bits_per_weight(t) * sizes[n] for n, t in choice.items()) / total

    lo, hi = 0.0, 1.0
    while bpw(pick(hi)) > target and hi < 1e30:
        hi *= 10
    for _ in range(100):  # bisection on λ: larger λ, fewer bits
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if bpw(pick(mid)) > target else (lo, mid)
    return pick(hi)
