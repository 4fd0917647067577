"""Speculative decoding: draft several tokens cheaply, verify them in one forward of the model, keep the
longest prefix the model agrees with.

Two drafters. PromptLookup copies what followed the latest earlier occurrence of the last n tokens, from the
prompt and the output so far (RAG answers quote their context, edits and summaries copy spans). DraftModel
asks a smaller model with the same tokenizer.

Acceptance is the standard speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023): draft token
d, drawn from the draft's distribution q, is kept with probability min(1, p(d)/q(d)) under the target's
distribution p (after the same penalty, temperature and top-k/top-p as plain sampling); at the first
rejection the next token is drawn from max(0, p − q), renormalised; when every draft is kept one more
token is drawn from p. Every emitted token is then distributed exactly as plain sampling's. Greedy decoding
keeps a draft only if it is the target's argmax, so its output is plain greedy's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol, Sequence

import numpy as np

from kanana_quant.runtimes.sampling import Sampler


@dataclass
class Draft:
    tokens: list[int]
    # Per token, the distribution it was drawn from (the drafter's q), or None: drawn deterministically,
    # q = one-hot on the token.
    probs: list[np.ndarray] | None = None


class Drafter(Protocol):
    # True when pausing saves the drafter nothing: a draft model's cache must still read every token emitted
    # meanwhile, at its next proposal. Decoding then stops drafting for the rest of a text that keeps
    # drafting slow, instead of pausing and paying that catch-up again and again.
    pausing_is_free: bool

    def start(self, prompt: Sequence[int]) -> None:
        """The target has just read `prompt`: get ready to draft after it (part of the prompt's prefill)."""

    def propose(self, history: Sequence[int], k: int) -> Draft:
        """Up to k tokens likely to follow `history` (fewer, or none, when it has no good guess)."""


@dataclass
class PromptLookup:
    """n-gram lookup in the sequence itself: the longest suffix of up to `max_ngram` tokens (at least
    `min_ngram`) that occurred before; its most recent earlier occurrence's continuation is the draft, no
    longer than the suffix that matched.

    Why that cap: the longer the matched suffix, the likelier the copy goes on, and a draft the model
    rejects still costs its verification. Replayed on SmolLM2's greedy answers to bench/data/tasks.json with a
    k-token verify costing 1 + 0.225·k plain steps (bench/lookup_sim.py), the speed-up over plain decoding
    went from 1.42 / 1.21 / 1.51 (summarise / quote / edit; 1–3-token matches, drafts of up to 8, a pause after
    every miss) to 1.77 / 1.32 / 1.67 with this rule and the timing pauses alone, chat from 1.03 to 1.06; at
    the 0.295 per token onnxruntime measured there on 2 threads, 1.61 / 1.26 / 1.53 and 1.04. A single
    matching token drafts nothing: one token recurs everywhere."""

    max_ngram: int = 8
    min_ngram: int = 2
    pausing_is_free: ClassVar[bool] = True

    def start(self, prompt: Sequence[int]) -> None:
        pass  # it reads the history itself at every step

    def propose(self, history: Sequence[int], k: int) -> Draft:
        if k <= 0:
            return Draft([])
        seq = np.asarray(history, dtype=np.int64)
        n_tokens = len(seq)
        for n in range(min(self.max_ngram, n_tokens - 1), self.min_ngram - 1, -1):
            suffix = seq[n_tokens - n:]
            # windows ending before the suffix itself: starts 0 .. n_tokens - n - 1
            windows = np.lib.stride_tricks.sliding_window_view(seq[:n_tokens - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n  # the latest occurrence: the freshest context
                draft = seq[start:start + min(k, n)].tolist()
                if draft:
                    return Draft(draft)
        return Draft([])


class DraftModel:
    """A smaller model with the same tokenizer drafts k tokens one by one with the target's sampling
    settings (so its q is the distribution the rule needs); its KV cache follows the accepted tokens."""

    pausing_is_free = False

    def __init__(self, engine, sampler: Sampler):
        self.engine, self.sampler = engine, sampler
        self.fed: list[int] = []  # tokens whose keys and values are in the draft engine's cache

    def start(self, prompt: Sequence[int]) -> None:
        """Prefill the draft's cache with the prompt alongside the target's, so that its cost counts as prefill
        and not against the first drafting step: with SmolLM2 4-bit drafting for its 8-bit self (onnxruntime,
        2 threads), an 850-token prompt read at the first proposal made that one step cost about 100 plain
        ones."""
        if len(prompt) < self.engine.max_seq_len:
            self._feed(prompt)

    def _feed(self, history: Sequence[int]) -> np.ndarray:
        """Bring the draft's cache to `history` (reusing its common prefix) and return the next-token logits."""
        history = list(history)
        keep = 0
        for a, b in zip(self.fed, history):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(history) - 1)  # feed at least one token, to get logits
        self.engine.pos = keep
        logits = self.engine.forward(history[keep:])
        self.fed = history
        return logits

    def propose(self, history: Sequence[int], k: int) -> Draft:
        history = list(history)
        if k <= 0 or len(history) + k > self.engine.max_seq_len:
            return Draft([])
        logits = self._feed(history)
        tokens, probs, seen = [], [], list(history)
        for i in range(k):
            filtered = self.sampler.filter_logits(logits, seen)
            if self.sampler.params.temperature == 0:
                token = int(np.argmax(filtered))
            else:
                q = Sampler.distribution(filtered)
                token = self.sampler.draw(q)
                probs.append(q)
            tokens.append(token)
            seen.append(token)
            if i + 1 < k:
                logits = self.engine.forward([token])
                self.fed.append(token)
        return Draft(tokens, probs if self.sampler.params.temperature > 0 else None)


# Weight of the newest plain step in the running cost of a plain token: it follows the cost's slow growth
# with the context while smoothing one-off stalls.
_PLAIN_EMA = 0.3


@dataclass
class Adaptive:
    """How many tokens to draft next, and when not to draft at all. k grows while drafts are accepted and
    shrinks when they are not.

    Drafting pauses after any drafting step that cost more time per emitted token than plain steps do (given
    `seconds`), for longer while such steps follow each other: a missed draft is such a step (one token for
    a verify and the drafting), and so is a partly kept one where verifying k tokens costs well over one
    token's time (llama.cpp's batched kernels). So open-ended text, where drafts rarely hold, decodes as
    plainly as ever (a separate pause after every miss, on top, cost the copying tasks speed in
    bench/lookup_sim.py's replay and bought nothing the timing does not). A plain step right
    after the first drafting one measures a plain step's cost if no plain step has yet. With temperature > 0
    the pauses change which random draws are made, so a seeded run's text can differ from run to run; every
    token is still distributed as in plain sampling.

    With `give_up`, that many slow drafting steps in a row end drafting for good (for a drafter whose pauses
    are not free, Drafter.pausing_is_free)."""

    k_max: int = 8
    k: int = 4
    give_up: int | None = None
    pause: int = 0  # plain steps left before drafting again
    slow: int = 0  # drafting steps in a row that cost more per token than plain ones
    accepted: int = field(default=0)
    proposed: int = field(default=0)
    plain_seconds: float | None = None  # running cost of one plain step (one emitted token)

    def size(self) -> int:
        if self.stopped:
            return 0
        if self.pause > 0:
            self.pause -= 1
            return 0
        return self.k

    def record(self, proposed: int, accepted: int, seconds: float | None = None) -> None:
        """One step: `proposed` drafted tokens, `accepted` of them kept, the step took `seconds` (drafting,
        the forward and the acceptance rule; None: not timed)."""
        if not proposed:
            if seconds is not None:
                self.plain_seconds = seconds if self.plain_seconds is None else (
                    _PLAIN_EMA * seconds + (1 - _PLAIN_EMA) * self.plain_seconds)
            return
        self.proposed += proposed
        self.accepted += accepted
        if accepted == proposed:
            self.k = min(self.k_max, self.k + 2)
        elif accepted == 0:
            self.k = max(1, self.k // 2)
        else:
            self.k = max(1, accepted + 1)
        if seconds is None:
            return
        if self.plain_seconds is None:
            self.pause = max(self.pause, 1)  # one plain step, to learn what drafting has to beat
        elif seconds / (accepted + 1) > self.plain_seconds:  # this step emitted accepted + 1 tokens
            self.slow += 1
            self.pause = max(self.pause, min(2 ** self.slow, 64))
        else:
            self.slow = 0

    @property
    def stopped(self) -> bool:
        # for good: once stopped no drafting step is recorded, so `slow` stays
        return self.give_up is not None and self.slow >= self.give_up

    @property
    def rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def verify(sampler: Sampler, rows: np.ndarray, draft: Draft, history: list[int]) -> tuple[list[int], int]:
    """Apply the acceptance rule to draft.tokens, whose target logits are rows[:len(tokens)] (row i is the
    distribution of the token after history + tokens[:i]); rows[len(tokens)] gives the bonus token.
    Returns (the emitted tokens, how many of them are accepted drafts): the kept drafts plus one token drawn
    by the rule."""
    greedy = sampler.params.temperature == 0
    seen = list(history)
    for i, d in enumerate(draft.tokens):
        filtered = sampler.filter_logits(rows[i], seen)
        if greedy:
            target = int(np.argmax(filtered))
            if target != d:
                return draft.tokens[:i] + [target], i
        else:
            p = Sampler.distribution(filtered)
            q_d = 1.0 if draft.probs is None else float(draft.probs[i][d])
            if sampler.rng.random() * q_d >= p[d]:  # rejected (u ≥ p/q)
                residual = p.copy()
                if draft.probs is None:
                    residual[d] = 0.0
                else:
                    residual = np.maximum(residual - draft.probs[i], 0.0)
                if residual.sum() <= 0:  # p ≤ q everywhere yet rejected: only by rounding; p itself is right
                    residual = p
                return draft.tokens[:i] + [sampler.draw(residual)], i
        seen.append(d)
    bonus = sampler(rows[len(draft.tokens)], seen)
    return draft.tokens + [bonus], len(draft.tokens)
