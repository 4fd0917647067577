"""Next-token sampling for the numpy runtime: repetition penalty, temperature, top-k, top-p.

Each step mirrors the transformers logits processor of the same name, in the same order
(penalty, temperature, top-k, top-p), so a seed-free comparison with ``model.generate`` keeps the
same candidate tokens. numpy only: this runs on edge devices without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kanana_quant.errors import KananaQuantError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. The defaults are greedy decoding with every filter off."""

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0  # 1.0 means off
    repetition_penalty: float = 1.0  # 1.0 means off
    seed: int | None = None

    def __post_init__(self) -> None:
        # `not (x >= 0)` rather than `x < 0` so that NaN is rejected too.
        if not (self.temperature >= 0):
            raise KananaQuantError(f"--temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise KananaQuantError(f"--top-k must be an integer >= 0, got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise KananaQuantError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not (self.repetition_penalty > 0):
            raise KananaQuantError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")


def _as_float(logits: np.ndarray) -> np.ndarray:
    # Keep float32 logits float32: the filters below compare against thresholds, and doing the
    # arithmetic in the same precision as transformers keeps boundary decisions identical.
    logits = np.asarray(logits)
    return logits.astype(np.result_type(logits.dtype, np.float32), copy=False)


def apply_repetition_penalty(logits: np.ndarray, previous_ids: Sequence[int], penalty: float) -> np.ndarray:
    """Penalise every distinct token in ``previous_ids`` once, like ``RepetitionPenaltyLogitsProcessor``.

    A negative logit is multiplied and a positive one divided, so a penalty > 1 always makes the
    token less likely. Ids outside the vocabulary are ignored, as transformers does.
    """
    out = _as_float(logits).copy()
    ids = np.unique(np.asarray(previous_ids, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < out.shape[-1])]
    score = out[ids]
    out[ids] = np.where(score < 0, score * penalty, score / penalty)
    return out


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Set everything below the k-th largest logit to -inf, like ``TopKLogitsWarper``.

    Tokens tied with the k-th largest are all kept, so more than k may survive.
    """
    out = _as_float(logits).copy()
    k = min(max(int(k), 1), out.shape[-1])
    kth = np.partition(out, -k)[-k]
    out[out < kth] = -np.inf
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches ``p``, like ``TopPLogitsWarper``.

    Walking up from the least likely token, a token is removed while the cumulative probability
    is still <= 1 - p; the most likely token is always kept.
    """
    out = _as_float(logits).copy()
    # Stable ascending sort: among tied logits straddling the cut the lower ids go first. torch's
    # sort is unstable there, so that choice is arbitrary in transformers; the count kept matches.
    order = np.argsort(out, kind="stable")
    probs = _softmax(out[order])
    # torch's CPU cumsum accumulates float32 in float64 and rounds each partial sum back.
    cumulative = np.cumsum(probs, dtype=np.float64).astype(out.dtype)
    remove = cumulative <= out.dtype.type(1.0 - p)
    remove[-1] = False
    out[order[remove]] = -np.inf
    return out


class Sampler:
    """Picks next tokens with a private random generator, so one seed replays one sequence."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def filter_logits(self, logits: np.ndarray, previous_ids: Sequence[int]) -> np.ndarray:
        """Return the logits the draw uses: penalised, tempered and cut, with removed tokens at -inf.

        With temperature 0 only the repetition penalty applies, since greedy takes the maximum anyway.
        """
        p = self.params
        logits = _as_float(logits)
        if logits.ndim != 1:
            raise ValueError(f"expected 1-D logits, got shape {logits.shape}")
        if p.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, previous_ids, p.repetition_penalty)
        if p.temperature == 0:
            return logits
        logits = logits / logits.dtype.type(p.temperature)
        # Off means skipped, not applied with a neutral value: transformers does not add these
        # warpers then, and top_p=1.0 would still drop tokens whose probability underflows to 0.
        if p.top_k > 0:
            logits = apply_top_k(logits, p.top_k)
        if p.top_p < 1.0:
            logits = apply_top_p(logits, p.top_p)
        return logits

    def __call__(self, logits: np.ndarray, previous_ids: Sequence[int]) -> int:
        """Return the next token id for a 1-D logits vector, given the ids seen so far."""
        logits = self.filter_logits(logits, previous_ids)
        if self.params.temperature == 0:
            return int(np.argmax(logits))  # first maximum wins, like torch.argmax
        return self.draw(self.distribution(logits))

    @staticmethod
    def distribution(filtered_logits: np.ndarray) -> np.ndarray:
        """The probabilities a draw uses (float64), from filter_logits' output."""
        return _softmax(filtered_logits.astype(np.float64))

    def draw(self, probs: np.ndarray) -> int:
        """One token from a distribution (unnormalised is fine), with this sampler's random generator."""
        cdf = np.cumsum(probs)
        # Inverse-CDF draw: a token with probability 0 owns an empty interval and is never chosen.
        i = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        # Rounding can push the draw onto the last edge; fall back to the last possible token.
        return min(i, int(np.flatnonzero(probs)[-1]))
