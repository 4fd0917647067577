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


def window_logits(engine, window: Sequence[int]) -> np.ndarray:
    """Logits at every position of a window scored on its own, with no BOS added."""
    engine.reset()
    return engine.forward(window, all_logits=True)


def window_nll(logits: np.ndarray, window: Sequence[int]) -> float:
    """Sum of -log p(token | previous tokens in the window) over positions 1..N-1."""
    targets = np.asarray(window[1:])
    return float(-log_softmax(logits[:-1])[np.arange(len(targets)), targets].sum())


def window_kl(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(P_ref ‖ P) per position, in nats."""
    ref_logp, logp = log_softmax(ref_logits), log_softmax(logits)
    return (np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1)


def perplexity(engine, ids: Sequence[int], ctx: int, on_window: Callable[[int], None] | None = None,
               ref=None) -> dict:
    """Perplexity of `engine`; with a `ref` engine (the float model) also the reference's perplexity and
    the mean KL divergence from the reference's next-token distribution at every scored position."""
    if ctx < 2:
        raise KananaQuantError(f"--ctx must be at least 2, got {ctx}")
    if ctx > engine.max_seq_len:
        raise KananaQuantError(f"--ctx {ctx} exceeds the model's context of {engine.max_seq_len} tokens")
    windows = len(ids) // ctx
    if windows == 0:
        raise KananaQuantError(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}; "
                               "use a longer text or a smaller --ctx")
    total = ref_total = kl = 0.0
    for w in range(windows):
        window = ids[w * ctx:(w + 1) * ctx]
        logits = window_logits(engine, window)
        total += window_nll(logits, window)
        if ref is not None:
            ref_logits = window_logits(ref, window)
            ref_total += window_nll(ref_logits, window)
            kl += float(window_kl(ref_logits[:-1], logits[:-1]).sum())
        if on_window:
            on_window(w)
    scored = windows * (ctx - 1)
    result = {"perplexity": math.exp(total / scored), "nll": total / scored, "tokens": scored,
              "windows": windows, "ctx": ctx}
    if ref is not None:
        result |= {"ref_perplexity": math.exp(ref_total / scored), "kl_divergence": kl / scored}
    return result
