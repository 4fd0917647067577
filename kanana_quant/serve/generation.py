"""One request's generation, run in a slot's worker thread: decode (with its grammar, if any), turn tokens into
text without splitting a UTF-8 character, cut at stop strings, split tool calls from content, and hand each
piece to the request's handler as it becomes certain."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

from kanana_quant.chat_format import Content, ToolCallParser
from kanana_quant.errors import KananaQuantError
from kanana_quant.runtimes.generate import Constraint, Decoding, Step, common_prefix
from kanana_quant.runtimes.sampling import SamplingParams
from kanana_quant.runtimes.speculative import PromptLookup
from kanana_quant.serve.slots import Slot
from kanana_quant.tokenizer import Tokenizer


@dataclass
class Piece:
    """What a step made certain: content text, tool-call events, and the steps (for logprobs) behind them."""

    events: list = field(default_factory=list)  # Content / CallStart / CallArguments
    steps: list[Step] = field(default_factory=list)


@dataclass
class Finish:
    reason: str  # stop | length | tool_calls
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Failure:
    error: BaseException


class StopStrings:
    """Cuts text at the first stop string, holding back an end that could still become one."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self.pending = list(stops), ""
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def push(self, text: str) -> tuple[str, bool]:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        cut = max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Generation:
    """A Job for slots.SlotPool. `emit` receives Piece, then Finish or Failure, from the worker thread."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], max_tokens: int, params: SamplingParams,
                 emit: Callable[[object], None], constraint: Constraint | None = None, stops: Sequence[str] = (),
                 tools: bool = False, logprobs: int | None = None, python_tag: int | None = None):
        self.tok, self.prompt_ids, self.max_tokens, self.params = tokenizer, list(prompt_ids), max_tokens, params
        self.emit, self.constraint, self.stops, self.tools = emit, constraint, stops, tools
        self.logprobs, self.python_tag = logprobs, python_tag
        self.cancelled = threading.Event()

    def run(self, slot: Slot) -> BaseException | None:
        engine, ids = slot.engine, self.prompt_ids
        reuse = min(common_prefix(slot.cached, ids), len(ids) - 1)  # at least one token to run
        generated: list[int] = []
        try:
            self._decode(engine, reuse, generated)
            return None
        except Exception as e:  # the engine crashed or refused: the client gets one line
            self.emit(Failure(e))
            return e
        finally:
            # The last sampled token was never fed back, so the cache holds everything before it.
            slot.cached = (ids + generated)[: engine.pos]

    def _decode(self, engine, reuse: int, generated: list[int]) -> None:
        # Prompt lookup drafts for free-text requests (RAG answers quote their context); a grammar decodes plainly.
        decoding = Decoding(engine, self.prompt_ids, self.max_tokens, self.params, self.tok.eos_ids, reuse,
                            self.constraint, self.logprobs, drafter=PromptLookup())
        text, stopper = self.tok.stream(), StopStrings(self.stops)
        parser = ToolCallParser() if self.tools else None
        reason, pending = None, []
        for step in decoding:
            if self.cancelled.is_set():
                return
            generated.append(step.token)
            pending.append(step)
            if parser is not None and step.token == self.python_tag:
                events = parser.python_tag()
            else:
                piece, stopped = stopper.push(text.push(step.token))
                events = parser.feed(piece) if parser else ([Content(piece)] if piece else [])
                if stopped:
                    reason = "stop"
            if events or reason:
                self.emit(Piece(events, pending))
                pending = []
            if reason:
                break
        events = []
        if reason is None:
            piece, stopped = stopper.push(text.flush())
            piece += "" if stopped else stopper.flush()
            reason = "stop" if stopped else decoding.finish_reason
            events = parser.feed(piece) if parser else ([Content(piece)] if piece else [])
        if parser is not None:
            events += parser.finish()
            if parser.calls and reason == "stop":
                reason = "tool_calls"
        if events or pending:
            self.emit(Piece(events, pending))
        self.emit(Finish(reason, len(self.prompt_ids), len(generated), reuse))


def check_prompt(prompt_ids: Sequence[int], context: int) -> None:
    if len(prompt_ids) >= context:
        raise KananaQuantError(f"this model's context is {context} tokens; the prompt has {len(prompt_ids)}, "
                               "which leaves no room for a reply")

