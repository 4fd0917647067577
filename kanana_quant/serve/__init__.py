"""`kanana-quant serve`: an OpenAI-compatible HTTP server with Kanana tool calling, grammar-enforced structured
output, request slots and a chat page. Needs the `serve` extra (FastAPI, uvicorn, llguidance, jsonschema).

    app.py         routes, SSE streaming, body-size cap, API key
    schemas.py     OpenAI request bodies (pydantic)
    errors.py      OpenAI error objects for every failure
    service.py     a request -> prompt, sampling, grammar, stop strings
    generation.py  one request's decode loop in a slot's worker thread
    embeddings.py  /v1/embeddings for an embedding model (a thin layer over embed.embed)
    slots.py       engine instances, the bounded queue, cancellation
    static/        the chat page (no build step, no CDN)
"""

from __future__ import annotations

import logging
import socket

from kanana_quant.serve.service import Service, Settings

__all__ = ["Service", "Settings", "open_service", "run"]


def open_service(model: str, settings: Settings):
    """The Service of a generative model, or the EmbeddingService of an embedding model."""
    from kanana_quant.hub import resolve_model
    from kanana_quant.loader import open_model
    from kanana_quant.runtimes.engines import resolve_engine

    resolve_engine(settings.engine, resolve_model(model))  # a wrong --engine fails before any loading
    loaded = open_model(model)
    if loaded.config.embedding is not None:
        from kanana_quant.serve.embeddings import EmbeddingService

        return EmbeddingService(loaded, settings)
    return Service(loaded, settings)


def run(service: Service, host: str, port: int, sock: socket.socket | None = None, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM), then close the slots' engines."""
    import uvicorn

    from kanana_quant.serve.app import create_app

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(message)s")
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock] if sock else None)
    finally:
        service.close()
