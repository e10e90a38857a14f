"""Every error the API returns, in OpenAI's shape `{"error": {message, type, param, code}}`.

Maps the engine's `EngineError`s, FastAPI's validation errors, Starlette's HTTP errors and any
unexpected exception to a status and that body. Validation errors become 400 (as OpenAI answers
invalid parameters), with `param` naming the field; the body is never echoed back.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as p

log = logging.getLogger(__name__)

CLIENT_GONE = 499  # nginx's "client closed request"
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


class ClientGone(Exception):
    """The client disconnected before its response was ready (answered 499, never read)."""


class ApiError(Exception):
    """An error with its HTTP status; raised by routes, rendered by `error_response`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None):
    kind = TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: ApiError) -> JSONResponse:
    body = error_body(err.status, err.message, err.code, err.param)
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def from_engine_error(e: p.EngineError, retry_after_s: int = 1) -> ApiError:
    """The ApiError for an engine error (the engine's message is kept: it names the problem)."""
    msg = str(e) or type(e).__name__
    if isinstance(e, p.QueueFull):
        return ApiError(429, msg, "queue_full", headers={"Retry-After": str(retry_after_s)})
    if isinstance(e, p.ContextTooLong):
        return ApiError(400, msg, "context_length_exceeded", "prompt")
    if isinstance(e, p.AdapterNotLoaded):
        return ApiError(404, msg, "model_not_found", "model")
    if isinstance(e, p.InvalidAdapterName):
        return ApiError(400, msg, "invalid_adapter_name", "name")
    if isinstance(e, p.AdapterNotFound):
        return ApiError(404, msg, "adapter_not_found", "name")
    if isinstance(e, p.AdapterBaseMismatch):
        return ApiError(409, msg, "adapter_fingerprint_mismatch")
    if isinstance(e, p.AdapterConflict):
        return ApiError(409, msg, "adapter_refused")
    if isinstance(e, p.InvalidRequest):
        return ApiError(400, msg, "invalid_value")
    if isinstance(e, p.GenerationFailed):
        return ApiError(500, msg, "generation_failed")
    if isinstance(e, p.EngineNotReady):
        return ApiError(503, msg, "not_ready", headers={"Retry-After": str(retry_after_s)})
    log.error("unmapped engine error %s: %s", type(e).__name__, msg)
    return ApiError(500, msg, "engine_error")


SOURCES = ("body", "query", "path", "header")
TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "function-after", "function-before")


def _validation_param(loc: tuple) -> str | None:
    """`("body", "messages", 0, "role")` -> "messages.0.role"; a union's member tags dropped."""
    parts = []
    for x in loc:
        s = str(x)
        if s in SOURCES and not parts:
            continue
        if s in TYPE_TAGS or "[" in s:
            break
        parts.append(s)
    return ".".join(parts) or None


def _validation_message(err: dict) -> str:
    where = _validation_param(tuple(err.get("loc", ())))
    msg = err.get("msg", "invalid value")
    return f"{where}: {msg}" if where else msg


def install_error_handlers(app: FastAPI, retry_after_s: int = 1) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(p.EngineError)
    async def _engine(_: Request, e: p.EngineError):
        return error_response(from_engine_error(e, retry_after_s))

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, e: ClientGone):
        return Response(status_code=CLIENT_GONE)  # nobody reads it; the metrics count it

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        errors = e.errors()
        # a validator's own message (e.g. a lone surrogate) says more than a union's type misses
        first = next(
            (x for x in errors if x.get("type") == "value_error"), errors[0] if errors else {}
        )
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
            return error_response(ApiError(400, message.rstrip(": "), "invalid_json"))
        param = _validation_param(tuple(first.get("loc", ())))
        return error_response(ApiError(400, _validation_message(first), "invalid_value", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        err = ApiError(e.status_code, str(e.detail), code, headers=dict(e.headers or {}))
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(ApiError(500, "internal server error", "internal_error"))
