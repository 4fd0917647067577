"""/v1/embeddings for an embedding model: OpenAI's request and response around `embed.embed`, nothing more.

Inputs are strings (one or a list); OpenAI's token-array inputs are refused, since the model's input format
(BOS, the query's instruction prefix) is ours to build. `instruction` (an extension) embeds the inputs as
queries. Vectors are unit length, as OpenAI's are; `dimensions` takes the Matryoshka sizes the model declares;
`encoding_format: base64` sends little-endian float32 bytes (the openai client asks for it by default). One
encoder answers requests one batch at a time; up to `--queue` requests wait, beyond that 503.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Literal, Union

import numpy as np
from pydantic import Field

from kanana_quant import __version__
from kanana_quant.embed import check_dim, embed, embedding_config, encode_texts
from kanana_quant.errors import KananaQuantError
from kanana_quant.serve.errors import APIError
from kanana_quant.serve.schemas import Strict

MAX_INPUTS = 2048  # OpenAI's limit per request


class EmbeddingRequest(Strict):
    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None  # accepted and ignored
    instruction: str | None = None  # ours: embed the inputs as queries with this instruction


class EmbeddingService:
    """The server's model when it is an encoder: one engine, a bounded wait, OpenAI's response shape."""

    kind = "embedding"

    def __init__(self, loaded, settings):
        from kanana_quant.runtimes.engines import open_encoder

        self.loaded, self.settings = loaded, settings
        self.emb = embedding_config(loaded.config, str(loaded.path))
        self.name = settings.name or (loaded.path.stem if loaded.path.suffix == ".gguf" else loaded.path.name)
        self.encoder = open_encoder(loaded, settings.engine, threads=settings.threads)
        self.engine_name = self.encoder.name
        self.context = self.emb.max_length
        self.fingerprint = f"kanana-quant-{__version__}-{self.engine_name}"
        self._lock = threading.Lock()
        self._waiting = 0

    def close(self) -> None:
        pass

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.name!r}",
                           "model", "model_not_found")

    def health(self) -> dict:
        return {"status": "ok", "model": self.name, "engine": self.engine_name, "context": self.context,
                "kind": self.kind, "queued": self._waiting}

    def _texts(self, req: EmbeddingRequest) -> list[str]:
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            raise APIError(400, "input is empty; send a string or a list of strings", "input")
        if not all(isinstance(t, str) for t in texts):
            raise APIError(400, "token-array inputs are not supported; send the text (the server builds the "
                           "model's input format itself)", "input")
        if len(texts) > MAX_INPUTS:
            raise APIError(400, f"{len(texts)} inputs is over {MAX_INPUTS} per request", "input")
        if any(not t.strip() for t in texts):
            raise APIError(400, "an input is empty; every input needs some text", "input")
        return texts

    async def create(self, req: EmbeddingRequest) -> dict:
        self.check_model(req.model)
        texts = self._texts(req)
        try:
            size = check_dim(self.emb, req.dimensions, self.name)
        except KananaQuantError as e:
            raise APIError(400, str(e), "dimensions") from None
        if self._waiting >= self.settings.max_queue + 1:
            raise APIError(503, f"the server is busy ({self._waiting} requests waiting); retry in 1 s",
                           code="server_busy", headers={"Retry-After": "1"})
        self._waiting += 1
        try:
            vectors, tokens = await asyncio.to_thread(self._run, texts, req.instruction, size)
        finally:
            self._waiting -= 1
        data = [{"object": "embedding", "index": i,
                 "embedding": _encode(row, req.encoding_format)} for i, row in enumerate(vectors)]
        return {"object": "list", "data": data, "model": self.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def _run(self, texts: list[str], instruction: str | None, size: int) -> tuple[np.ndarray, int]:
        loaded = self.loaded
        tokens = sum(len(r.ids) for r in encode_texts(loaded.tokenizer, self.emb, texts, instruction))
        with self._lock:  # one encoder, one batch at a time
            vectors = embed(self.encoder, loaded.tokenizer, loaded.config, texts, instruction=instruction,
                            dim=size, normalize=True, source=self.name)
        return vectors, tokens


def _encode(row: np.ndarray, fmt: str):
    if fmt == "base64":
        return base64.b64encode(np.ascontiguousarray(row, "<f4").tobytes()).decode("ascii")
    return [float(v) for v in row]
