"""Perplexity on any engine: consecutive non-overlapping windows, each scored on its own."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from kanana_quant.errors import KananaQuantError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def window_nll(engine, window: Sequence[int]) -> float:
    """Sum of -log p(token | previous tokens in the window) over positions 1..N-1, with no BOS added."""
    engine.reset()
    logp = log_softmax(engine.forward(window, all_logits=True))
    targets = np.asarray(window[1:])
    return float(-logp[np.arange(len(targets)), targets].sum())


def perplexity(engine, ids: Sequence[int], ctx: int, on_window: Callable[[int], None] | None = None) -> dict:
    if ctx < 2:
        raise KananaQuantError(f"--ctx must be at least 2, got {ctx}")
    if ctx > engine.max_seq_len:
        raise KananaQuantError(f"--ctx {ctx} exceeds the model's context of {engine.max_seq_len} tokens")
    windows = len(ids) // ctx
    if windows == 0:
        raise KananaQuantError(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}; "
                               "use a longer text or a smaller --ctx")
    total = 0.0
    for w in range(windows):
        total += window_nll(engine, ids[w * ctx:(w + 1) * ctx])
        if on_window:
            on_window(w)
    scored = windows * (ctx - 1)
    return {"perplexity": math.exp(total / scored), "nll": total / scored, "tokens": scored,
            "windows": windows, "ctx": ctx}
