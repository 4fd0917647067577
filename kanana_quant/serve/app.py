"""The HTTP layer: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, /health, and the chat page
at /. Requests are validated (schemas.py), turned into generations (service.py), queued for a slot
(slots.py), and their pieces written back as one JSON body or as server-sent events."""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from importlib import resources
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from kanana_quant.chat_format import CallArguments, CallStart, Content
from kanana_quant.serve import errors
from kanana_quant.serve.embeddings import EmbeddingRequest, EmbeddingService
from kanana_quant.serve.errors import APIError
from kanana_quant.serve.generation import Failure, Finish, Generation, Piece
from kanana_quant.serve.schemas import ChatRequest, CompletionRequest
from kanana_quant.serve.service import Service
from kanana_quant.serve.slots import QueueFull

MAX_BODY_BYTES = 8 << 20  # a 128K-token prompt is well under 1 MB of text
POLL_SECONDS = 0.5  # how often a non-streaming request checks that its client is still there
PAGE_CSP = "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'"


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 before the app sees it (by its
    Content-Length, or by counting while it arrives); a body within the limit is read whole and handed on."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # what comes after the body: the disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send):
        payload = json.dumps(errors.body(413, f"request body over {self.limit >> 20} MiB")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def _authorizer(key: str | None):
    def authorized(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "incorrect or missing API key; send `Authorization: Bearer <key>`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return authorized


def _base_app(service: Service | EmbeddingService):
    """The app every model gets: body limit, OpenAI-style errors, the API key check, /health and /v1/models."""
    app = FastAPI(title="kanana-quant", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    errors.install(app)
    authorized = _authorizer(service.settings.api_key)

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{name}", dependencies=[Depends(authorized)])
    async def model(name: str):
        service.check_model(name)
        return _model_card(service)

    return app, authorized


def _embedding_app(service: EmbeddingService) -> FastAPI:
    """An embedding model's server: /v1/embeddings, /v1/models and /health; generation routes say why not."""
    app, authorized = _base_app(service)

    @app.post("/v1/embeddings", dependencies=[Depends(authorized)])
    async def embeddings(req: EmbeddingRequest):
        return await service.create(req)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def generation():
        raise APIError(400, f"{service.name!r} is an embedding model; it answers /v1/embeddings only",
                       code="unsupported_model")

    return app


def create_app(service: Service | EmbeddingService) -> FastAPI:
    if isinstance(service, EmbeddingService):
        return _embedding_app(service)
    app, authorized = _base_app(service)
    static = resources.files("kanana_quant.serve").joinpath("static")
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        html = static.joinpath("index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"})

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(req: ChatRequest, request: Request):
        events = _Events()
        gen = service.chat(req, events.emit)
        ident, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        head = {"id": ident, "created": created, "model": service.name, "system_fingerprint": service.fingerprint}
        first = await _start(service, gen, events)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return _sse(_chat_chunks(service, gen, events, first, head, usage))
        return await _collect(request, service, gen, events, first, lambda evs: _chat_body(service, gen, evs, head))

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(req: CompletionRequest, request: Request):
        events = _Events()
        gen, prompt_text = service.completion(req, events.emit)
        echo = prompt_text if req.echo else ""
        ident, created = "cmpl-" + secrets.token_hex(12), int(time.time())
        head = {"id": ident, "created": created, "model": service.name, "system_fingerprint": service.fingerprint}
        first = await _start(service, gen, events)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return _sse(_completion_chunks(service, gen, events, first, head, usage, echo))
        return await _collect(request, service, gen, events, first,
                              lambda evs: _completion_body(service, gen, evs, head, echo))

    @app.post("/v1/embeddings", dependencies=[Depends(authorized)])
    async def embeddings():
        raise APIError(400, f"{service.name!r} is a generative model; /v1/embeddings needs an embedding model "
                       "(e.g. kanana-nano-2.1b-embedding)", code="unsupported_model")

    return app


def _model_card(service: Service) -> dict:
    return {"id": service.name, "object": "model", "created": 0, "owned_by": "kanana-quant",
            "engine": service.engine_name, "context_length": service.context}


# ---------------------------------------------------------------------------------------------------------
# From the worker thread to this event loop


class _Events:
    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def emit(self, event) -> None:  # called from a slot's worker thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def next(self):
        return await self.queue.get()


async def _start(service: Service, gen: Generation, events: _Events):
    """Queue the generation and wait for its first event, so that a failure before any output (a crashed
    engine) is still an error status, not a stream that breaks."""
    try:
        service.pool.submit(gen)
    except QueueFull as e:
        raise APIError(503, f"the server is busy ({service.pool.stats()['queued']} requests waiting); retry "
                       f"in {e.retry_after} s", code="server_busy", headers={"Retry-After": str(e.retry_after)})
    try:
        first = await events.next()
    except BaseException:  # the client went away while waiting
        service.pool.cancel(gen)
        raise
    if isinstance(first, Failure):
        raise first.error
    return first


async def _collect(request: Request, service: Service, gen: Generation, events: _Events, first, build):
    collected = [first]
    loop = asyncio.get_running_loop()
    check_at = loop.time() + POLL_SECONDS
    try:
        while not isinstance(collected[-1], (Finish, Failure)):
            try:
                collected.append(await asyncio.wait_for(events.next(), POLL_SECONDS))
            except asyncio.TimeoutError:
                pass
            # on a clock, not only when tokens pause: a fast model never pauses, and its client may be gone
            if loop.time() >= check_at:
                check_at = loop.time() + POLL_SECONDS
                if await request.is_disconnected():
                    service.pool.cancel(gen)
                    return Response(status_code=499)
    finally:
        if not isinstance(collected[-1], (Finish, Failure)):
            service.pool.cancel(gen)
    if isinstance(collected[-1], Failure):
        raise collected[-1].error
    return JSONResponse(build(collected))


def _sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(service: Service, gen: Generation, events: _Events, first) -> AsyncIterator:
    """The generation's events until Finish; a Failure mid-stream raises. Leaving early (the client
    disconnected) cancels the generation, which frees its slot at the next token."""
    event = first
    try:
        while True:
            if isinstance(event, Failure):
                raise event.error
            yield event
            if isinstance(event, Finish):
                return
            event = await events.next()
    finally:
        service.pool.cancel(gen)


def _usage(finish: Finish) -> dict:
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finish.cached_tokens}}


def _error_event(e: BaseException) -> str:
    return _data(errors.body(500, str(e).splitlines()[0][:500] if str(e) else type(e).__name__))


# ---------------------------------------------------------------------------------------------------------
# Chat completions


def _chat_logprobs(service: Service, steps) -> list[dict]:
    out = []
    for s in steps:
        text, raw = service.token_text(s.token)
        top = []
        for token, lp in s.top:
            t, b = service.token_text(token)
            top.append({"token": t, "logprob": lp, "bytes": b})
        out.append({"token": text, "logprob": s.logprob, "bytes": raw, "top_logprobs": top})
    return out


def _chat_delta(event) -> dict:
    if isinstance(event, Content):
        return {"content": event.text}
    if isinstance(event, CallStart):
        return {"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                "function": {"name": event.name, "arguments": ""}}]}
    assert isinstance(event, CallArguments)
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}


async def _chat_chunks(service: Service, gen: Generation, events: _Events, first, head: dict,
                       usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None = None, steps=()) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if gen.logprobs is not None and steps:
            choice["logprobs"] = {"content": _chat_logprobs(service, steps), "refusal": None}
        return _data({**head, "object": "chat.completion.chunk", "choices": [choice],
                      **({"usage": None} if usage else {})})

    yield chunk({"role": "assistant", "content": ""})
    carried: list = []  # steps not yet sent with a delta
    try:
        async for event in _stream(service, gen, events, first):
            if isinstance(event, Piece):
                carried += event.steps
                for e in event.events:
                    yield chunk(_chat_delta(e), steps=carried)
                    carried = []
            else:
                yield chunk({}, event.reason, carried)
                if usage:
                    yield _data({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(event)})
    except Exception as e:
        yield _error_event(e)
    yield "data: [DONE]\n\n"


def _chat_body(service: Service, gen: Generation, collected: list, head: dict) -> dict:
    content, calls, steps = [], [], []
    for event in collected[:-1]:
        steps += event.steps
        for e in event.events:
            if isinstance(e, Content):
                content.append(e.text)
            elif isinstance(e, CallStart):
                calls.append({"id": e.id, "type": "function", "function": {"name": e.name, "arguments": ""}})
            else:
                calls[e.index]["function"]["arguments"] += e.text
    finish: Finish = collected[-1]
    text = "".join(content)
    message = {"role": "assistant", "content": text if text or not calls else None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    logprobs = None
    if gen.logprobs is not None:
        logprobs = {"content": _chat_logprobs(service, steps), "refusal": None}
    return {**head, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish.reason}],
            "usage": _usage(finish)}


# ---------------------------------------------------------------------------------------------------------
# Completions


def _completion_logprobs(service: Service, steps, offset: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for s in steps:
        text, _ = service.token_text(s.token)
        tokens.append(text)
        lps.append(s.logprob)
        tops.append({service.token_text(t)[0]: lp for t, lp in s.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def _completion_chunks(service: Service, gen: Generation, events: _Events, first, head: dict, usage: bool,
                             echo: str) -> AsyncIterator[str]:
    offset = 0

    def chunk(text: str, finish: str | None = None, steps=()) -> str:
        nonlocal offset
        logprobs = None
        if gen.logprobs is not None:
            logprobs = _completion_logprobs(service, steps, offset)
        offset += len(text)
        return _data({**head, "object": "text_completion",
                      "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
                      **({"usage": None} if usage else {})})

    if echo:
        yield chunk(echo)
    try:
        async for event in _stream(service, gen, events, first):
            if isinstance(event, Piece):
                yield chunk("".join(e.text for e in event.events), steps=event.steps)
            else:
                yield chunk("", event.reason)
                if usage:
                    yield _data({**head, "object": "text_completion", "choices": [], "usage": _usage(event)})
    except Exception as e:
        yield _error_event(e)
    yield "data: [DONE]\n\n"


def _completion_body(service: Service, gen: Generation, collected: list, head: dict, echo: str) -> dict:
    pieces = collected[:-1]
    text = echo + "".join(e.text for p in pieces for e in p.events)
    steps = [s for p in pieces for s in p.steps]
    logprobs = _completion_logprobs(service, steps, len(echo)) if gen.logprobs is not None else None
    finish: Finish = collected[-1]
    return {**head, "object": "text_completion",
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish.reason}],
            "usage": _usage(finish)}
