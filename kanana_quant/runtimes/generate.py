"""Token generation and multi-turn chat over any engine (prefill / forward / pos)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import numpy as np

from kanana_quant.errors import KananaQuantError
from kanana_quant.runtimes.sampling import Sampler, SamplingParams
from kanana_quant.runtimes.speculative import Adaptive, Draft, Drafter, verify
from kanana_quant.tokenizer import Tokenizer


class Engine(Protocol):
    name: str
    max_seq_len: int
    pos: int  # tokens in the KV cache; setting it lower rewinds the cache

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray: ...

    def reset(self) -> None: ...


def thread_budget(threads: int | None) -> int | None:
    """An engine's thread count: as asked, else OMP_NUM_THREADS (the budget every engine here honours, so
    benchmarks can pin all of them at once), else None for the engine's own default."""
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return threads


def kv_capacity(length: int, capacity: int, max_seq_len: int, minimum: int = 256) -> int:
    """The KV-cache length an engine needs for `length` tokens: its current `capacity` if that holds them,
    else doubled (at least `minimum`, at most the context). Beyond the context it is the user's input."""
    if length > max_seq_len:
        raise KananaQuantError(f"context of {length} tokens exceeds the model's {max_seq_len}; "
                               "shorten the prompt or --max-tokens")
    if length <= capacity:
        return capacity
    return min(max(length, 2 * capacity, minimum), max_seq_len)


# Slow drafting steps in a row after which a drafter whose pauses are not free (a draft model) stops for the
# rest of the text. Pausing 2, 4, 8… steps would make it catch up on all of them at every retry.
DRAFT_MODEL_GIVE_UP = 3


class Constraint(Protocol):
    """Which tokens may come next (grammar-constrained decoding, runtimes.grammar): consulted before every
    draw and told every token drawn."""

    def allowed(self) -> np.ndarray: ...  # bool over the vocabulary

    def accept(self, token: int) -> None: ...

    def done(self) -> bool: ...  # nothing but the end of the sequence may follow


@dataclass
class Step:
    """One generated token, with its log-probability and the `top` most likely alternatives (token, logprob)
    under the model's own distribution (before temperature, filters or a grammar), when asked for."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    shifted = x - np.max(x)
    return shifted - np.log(np.exp(shifted).sum())


class Decoding:
    """Iterates the Steps of one generation; afterwards `finish_reason` says why it ended: "stop" (a stop
    id, or a grammar that admits nothing more) or "length" (max_tokens, or the context is full).

    With a `drafter` (runtimes.speculative) several drafted tokens are verified per forward and the output
    keeps plain decoding's distribution (greedy: its exact tokens). A grammar constraint decodes plainly."""

    def __init__(self, engine: Engine, prompt_ids: Sequence[int], max_tokens: int, params: SamplingParams,
                 stop_ids: Sequence[int] = (), cached: int = 0, constraint: Constraint | None = None,
                 logprobs: int | None = None, drafter: Drafter | None = None, k_max: int = 8):
        self.engine, self.prompt_ids, self.max_tokens, self.params = engine, list(prompt_ids), max_tokens, params
        self.stop_ids, self.cached, self.constraint, self.logprobs = set(stop_ids), cached, constraint, logprobs
        self.drafter = drafter if constraint is None else None
        self.adaptive = Adaptive(k_max=k_max, k=min(2, k_max), give_up=(
            None if self.drafter is None or self.drafter.pausing_is_free else DRAFT_MODEL_GIVE_UP))
        self.forwards = 0  # model forwards after the prompt (for speed accounting)
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[Step]:
        engine, sampler, history = self.engine, Sampler(self.params), list(self.prompt_ids)
        engine.pos = self.cached
        logits = engine.forward(history[self.cached:])
        self.finish_reason = "length"
        if self.drafter is not None:
            self.drafter.start(history)
            yield from self._speculative(sampler, history, logits)
            return
        for _ in range(self.max_tokens):
            if self.constraint is not None and self.constraint.done():
                self.finish_reason = "stop"
                return
            draw = logits
            if self.constraint is not None:
                allowed = self.constraint.allowed()
                draw = np.where(allowed, logits, -np.inf).astype(logits.dtype, copy=False)
            token = sampler(draw, history)
            if token in self.stop_ids:
                self.finish_reason = "stop"
                return
            if self.constraint is not None:
                self.constraint.accept(token)
            yield self._step(token, logits)
            history.append(token)
            if len(history) >= engine.max_seq_len:
                return
            logits = engine.forward([token])
            self.forwards += 1

    def _speculative(self, sampler: Sampler, history: list[int], logits: np.ndarray) -> Iterator[Step]:
        """Each forward feeds the last emitted token and the draft after it; its rows are the target's
        distributions for every draft position and one more."""
        engine, rows = self.engine, logits[None]
        emitted, produced = [sampler(logits, history)], 0
        while True:
            for i, token in enumerate(emitted):
                if token in self.stop_ids:
                    self.finish_reason = "stop"
                    return
                yield self._step(token, rows[i])
                history.append(token)
                produced += 1
                if produced >= self.max_tokens or len(history) >= engine.max_seq_len:
                    return
            room = min(self.max_tokens - produced - 1, engine.max_seq_len - len(history))
            k = min(self.adaptive.size(), room)
            began = time.perf_counter()
            draft = self.drafter.propose(history, k) if k > 0 else Draft([])
            draft.tokens = draft.tokens[:max(k, 0)]
            start = engine.pos  # the cache holds everything but the last emitted token
            rows = engine.forward([history[-1]] + draft.tokens, all_logits=True)
            self.forwards += 1
            emitted, kept = verify(sampler, rows, draft, history)
            self.adaptive.record(len(draft.tokens), kept, time.perf_counter() - began)
            engine.pos = start + 1 + kept  # drop the rejected drafts' keys and values

    def _step(self, token: int, logits: np.ndarray) -> Step:
        if self.logprobs is None:
            return Step(token)
        lp = log_softmax(logits)
        top = []
        if self.logprobs > 0:
            best = np.argpartition(-lp, self.logprobs - 1)[: self.logprobs]
            top = [(int(i), float(lp[i])) for i in best[np.argsort(-lp[best], kind="stable")]]
        return Step(token, float(lp[token]), top)


def generate(engine: Engine, prompt_ids: Sequence[int], max_tokens: int, params: SamplingParams,
             stop_ids: Sequence[int] = (), cached: int = 0, drafter: Drafter | None = None) -> Iterator[int]:
    """Yield sampled token ids until a stop id, max_tokens or the context limit.

    `cached` tokens of the prompt are already in the engine's KV cache (chat reuses earlier turns).
    """
    for step in Decoding(engine, prompt_ids, max_tokens, params, stop_ids, cached, drafter=drafter):
        yield step.token


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """Conversation history rendered with the model's chat template; the KV cache of earlier turns is
    reused up to the first token where the re-rendered conversation differs."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, params: SamplingParams, max_tokens: int,
                 system: str | None = None, drafter: Drafter | None = None):
        self.engine, self.tok, self.params, self.max_tokens = engine, tokenizer, params, max_tokens
        self.system, self.drafter = system, drafter
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cached: list[int] = []  # ids whose keys and values sit in the engine's cache
        self.engine.reset()

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the assistant's reply as text pieces. Closing the iterator early (Ctrl-C) keeps the
        partial reply in the history."""
        self.messages.append({"role": "user", "content": user_text})
        ids = self.tok.encode_chat(self.messages)
        # Keep at least one new token to run, so the forward pass yields logits.
        reuse = min(common_prefix(self.cached, ids), len(ids) - 1)
        stream, generated = self.tok.stream(), []
        try:
            for token in generate(self.engine, ids, self.max_tokens, self.params, self.tok.eos_ids, reuse,
                                  self.drafter):
                generated.append(token)
                piece = stream.push(token)
                if piece:
                    yield piece
            tail = stream.flush()
            if tail:
                yield tail
        finally:
            # The last sampled token was never fed back, so the cache holds everything before it.
            self.cached = (ids + generated)[: self.engine.pos]
            self.messages.append({"role": "assistant", "content": self.tok.decode(generated)})
