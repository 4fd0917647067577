"""The served model: opens the slots, and turns a validated OpenAI request into a Generation (prompt ids,
sampling, grammar, stop strings) or a 4xx naming what is wrong."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import jsonschema

from kanana_quant import __version__
from kanana_quant.chat_format import PYTHON_TAG, PYTHON_TOOL, render_prompt, tool_grammar
from kanana_quant.errors import KananaQuantError
from kanana_quant.runtimes.engines import open_engine
from kanana_quant.runtimes.grammar import GrammarCompiler
from kanana_quant.runtimes.sampling import SamplingParams
from kanana_quant.serve.errors import APIError
from kanana_quant.serve.generation import Generation, check_prompt
from kanana_quant.serve.schemas import MAX_STOPS, ChatRequest, CompletionRequest, Message, Sampling
from kanana_quant.serve.slots import SlotPool


MIN_TEMPERATURE = 1e-6


@dataclass
class Settings:
    engine: str = "auto"
    parallel: int = 1
    ctx: int | None = None
    max_queue: int = 16
    name: str | None = None
    api_key: str | None = None
    threads: int | None = None
    kv_type: str | None = None  # the engine's default


def model_name(path) -> str:
    return path.stem if path.suffix == ".gguf" else path.name


def slot_threads(parallel: int, threads: int | None) -> int | None:
    """Threads per slot: as asked, else the cores shared out among the slots (so N slots do not fight over
    the same cores); None keeps each engine's default when there is one slot."""
    if threads or parallel == 1:
        return threads
    return max(1, (os.cpu_count() or 1) // parallel)


class Service:
    def __init__(self, loaded, settings: Settings):
        if settings.parallel < 1:
            raise KananaQuantError(f"--parallel must be >= 1, got {settings.parallel}")
        if settings.max_queue < 0:
            raise KananaQuantError(f"--queue must be >= 0, got {settings.max_queue}")
        self.loaded, self.settings, self.tokenizer = loaded, settings, loaded.tokenizer
        self.name = settings.name or model_name(loaded.path)
        threads = slot_threads(settings.parallel, settings.threads)
        ctx = settings.ctx

        def opener():
            return open_engine(loaded, settings.engine, max_seq_len=ctx, threads=threads, kv_type=settings.kv_type)

        self.pool = SlotPool(opener, settings.parallel, settings.max_queue)
        first = self.pool.slots[0].engine
        self.engine_name, self.context = first.name, first.max_seq_len
        self.grammars = GrammarCompiler(self.tokenizer.to_files()["tokenizer.json"], loaded.config.vocab_size,
                                        self.tokenizer.eos_ids)
        self.python_tag = self.tokenizer.token_id(PYTHON_TAG)
        self.fingerprint = f"kanana-quant-{__version__}-{self.engine_name}"

    def close(self) -> None:
        self.pool.close()

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.name!r}",
                           "model", "model_not_found")

    # -----------------------------------------------------------------------------------------------------

    def _sampling(self, req: Sampling) -> SamplingParams:
        # Dividing float32 logits by a temperature near float32's smallest normal overflows them to inf; that
        # close to 0, sampling is greedy anyway. Seeds are any integer in OpenAI's API; numpy takes unsigned.
        temperature = req.temperature if req.temperature >= MIN_TEMPERATURE else 0.0
        seed = None if req.seed is None else req.seed % 2**64
        return SamplingParams(temperature=temperature, top_k=req.top_k, top_p=req.top_p,
                              repetition_penalty=req.repetition_penalty, seed=seed)

    def _stops(self, req: Sampling) -> list[str]:
        stops = req.stops()
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"stop takes at most {MAX_STOPS} sequences, got {len(stops)}", "stop")
        return stops

    def _budget(self, prompt_ids: list[int], asked: int | None) -> int:
        try:
            check_prompt(prompt_ids, self.context)
        except KananaQuantError as e:
            raise APIError(400, str(e), "messages", "context_length_exceeded") from None
        room = self.context - len(prompt_ids)
        return min(asked or room, room)

    def _schema(self, schema, param: str) -> dict:
        if not isinstance(schema, dict):
            raise APIError(400, f"{param} must be a JSON schema object", param, "invalid_json_schema")
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise APIError(400, f"{param} is not a valid JSON schema: {e.message[:300]}", param,
                           "invalid_json_schema") from None
        except (TypeError, ValueError, RecursionError) as e:
            raise APIError(400, f"{param} is not a valid JSON schema ({type(e).__name__})", param,
                           "invalid_json_schema") from None
        return schema

    def _compile(self, build: Callable, param: str):
        try:
            return build()
        except KananaQuantError as e:
            raise APIError(400, f"{param}: {e}", param, "invalid_json_schema") from None
        except RecursionError:
            raise APIError(400, f"{param}: schema nested too deeply", param, "invalid_json_schema") from None

    def chat(self, req: ChatRequest, emit: Callable[[object], None]) -> Generation:
        """Runs on the event loop's thread, deliberately: the chat-template sandbox bounds a render with a
        process-wide memory limit and (on the main thread) a timer, so renders must not overlap."""
        self.check_model(req.model)
        messages = [_message(m) for m in req.messages]
        tools = [t.function.model_dump(exclude_none=True) for t in req.tools or []]
        choice = req.tool_choice
        if isinstance(choice, str) or choice is None:
            choice = choice or ("auto" if tools else "none")
        else:
            choice = choice.function.name
            if choice not in {t["name"] for t in tools}:
                raise APIError(400, f"tool_choice names {choice!r}, which is not among the tools", "tool_choice")
        if choice != "none" and not tools:
            raise APIError(400, f"tool_choice {choice!r} needs tools", "tool_choice")
        names = [t["name"] for t in tools]
        if len(set(names)) != len(names):
            raise APIError(400, "tools have duplicate names", "tools")
        for i, tool in enumerate(tools):
            param = f"tools[{i}].function.parameters"
            if "parameters" in tool:
                schema = self._schema(tool["parameters"], param)
                if schema.get("type", "object") != "object":
                    raise APIError(400, f"{param} must describe an object (\"type\": \"object\")", param,
                                   "invalid_json_schema")
        offered = tools if choice != "none" else []  # tool_choice "none": the model is not told about tools
        fmt = req.response_format
        schema = None
        if fmt is not None and fmt.type != "text":
            if fmt.type == "json_object":
                schema = {"type": "object"}
            else:
                if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                    raise APIError(400, "response_format json_schema needs json_schema.schema",
                                   "response_format.json_schema")
                schema = self._schema(fmt.json_schema.schema_, "response_format.json_schema.schema")
            if offered:
                raise APIError(400, "response_format json_object/json_schema and tools cannot both be enforced; "
                               "send one, or tool_choice \"none\"", "response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        try:
            prompt = render_prompt(self.tokenizer, messages, offered)
        except KananaQuantError as e:
            raise APIError(400, str(e), "messages") from None
        ids = self.tokenizer.encode(prompt)
        budget = self._budget(ids, req.max_completion_tokens or req.max_tokens)
        grammar = None
        if offered:
            python = self.python_tag is not None and PYTHON_TOOL in names
            grammar = self._compile(lambda: self.grammars.lark(tool_grammar(offered, choice, req.parallel_tool_calls,
                                                                            python), "tools"), "tools")
        elif schema is not None:
            grammar = self._compile(lambda: self.grammars.json_schema(schema, "response_format"), "response_format")
        return Generation(self.tokenizer, ids, budget, self._sampling(req), emit,
                          grammar.start() if grammar else None, self._stops(req), bool(offered),
                          (req.top_logprobs or 0) if req.logprobs else None, self.python_tag)

    def completion(self, req: CompletionRequest, emit: Callable[[object], None]) -> tuple[Generation, str]:
        """The generation and the prompt's text (for echo)."""
        self.check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "this server completes one prompt per request", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids, text = self.tokenizer.encode(prompt, add_special_tokens=True), prompt
        else:
            vocab = self.loaded.config.vocab_size
            if not prompt or any(not 0 <= i < vocab for i in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
            ids, text = list(prompt), self.tokenizer.decode(prompt, skip_special_tokens=False)
        if not ids:
            raise APIError(400, "prompt is empty", "prompt")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs (the prompt's logprobs) is not supported", "echo")
        budget = self._budget(ids, req.max_tokens)
        gen = Generation(self.tokenizer, ids, budget, self._sampling(req), emit, None, self._stops(req),
                         False, req.logprobs, self.python_tag)
        return gen, text

    def token_text(self, token: int) -> tuple[str, list[int]]:
        """A token's text and bytes, for logprobs."""
        raw = self.grammars.token_bytes(token)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def health(self) -> dict:
        return {"status": "ok", "model": self.name, "engine": self.engine_name, "context": self.context,
                **self.pool.stats()}


def _message(m: Message) -> dict:
    content = m.content
    if isinstance(content, list):
        content = "".join(part.text for part in content)
    role = "system" if m.role == "developer" else m.role
    if role in ("system", "user", "tool") and content is None:
        raise APIError(400, f"a {m.role} message needs content", "messages")
    out = {"role": role, "content": content}
    if m.tool_calls:
        if role != "assistant":
            raise APIError(400, "only assistant messages carry tool_calls", "messages")
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": c.function.arguments}}
                             for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out

