"""Every failure the server reports is an OpenAI error object, `{"error": {"message", "type", "param",
"code"}}`, with the status OpenAI would use; never a traceback (those go to the server's log for 500s)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kanana_quant.errors import EngineCrashed, KananaQuantError

log = logging.getLogger("kanana_quant.serve")

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def response(status: int, message: str, param: str | None = None, code: str | None = None,
             headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body(status, message, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """One line for the first problem pydantic found, and the parameter it concerns."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        reason = err.get("ctx", {}).get("error", "syntax error")
        return f"request body is not valid JSON ({reason})", None, "invalid_json"
    if not loc and kind in ("model_attributes_type", "dict_type"):
        return "request body must be a JSON object (Content-Type: application/json)", None, "invalid_value"
    if kind == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param, "unknown_parameter"
    if kind == "missing":
        return f"missing required parameter: {param}", param, "missing_required_parameter"
    message = err.get("msg", "invalid value")
    return f"invalid value for {param}: {message}" if param else message, param, "invalid_value"


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return response(400, *_validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        messages = {404: f"no such endpoint: {request.method} {request.url.path}",
                    405: f"method {request.method} not allowed on {request.url.path}"}
        return response(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                        headers=exc.headers)

    @app.exception_handler(EngineCrashed)
    async def crashed(request: Request, exc: EngineCrashed):
        log.error("%s", exc)
        return response(500, str(exc), code="engine_crashed")

    @app.exception_handler(KananaQuantError)
    async def user_error(request: Request, exc: KananaQuantError):
        return response(400, str(exc))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return response(500, f"internal server error ({type(exc).__name__}); see the server's log")
