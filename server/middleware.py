"""Pure ASGI middleware: API keys (401), a request-body size limit (413), per-request metrics.

`Authenticate` checks the bearer key of every route but the open ones (`OPEN_PATHS`) before a
byte of the body is read, and leaves the caller's `Principal` in the request state. `BodyLimit`
reads at most `max_body_bytes` of a request body (rejecting early on a large Content-Length)
and replays it to the app, so nothing downstream sees an oversized body.
`RequestMetrics` counts each generation request by adapter and status when its response starts
(the route names the adapter on `request.state.adapter_label`; "-" before it is known).
`InternalErrors` turns an unexpected exception into one logged traceback and a 500.
"""

from __future__ import annotations

import json
import logging

from .auth import KeyTable, bearer_token
from .errors import error_body
from .metrics import UNKNOWN, ServerMetrics

log = logging.getLogger(__name__)
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
OPEN_PATHS = ("/health", "/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _too_large(limit: int) -> dict:
    return error_body(413, f"request body exceeds {limit} bytes", "request_too_large")


def _header(scope, name: bytes) -> str | None:
    value = dict(scope["headers"]).get(name)
    return value.decode("latin-1") if value is not None else None


class Authenticate:
    """401 for a missing or unknown key on every route but OPEN_PATHS (none without keys)."""

    def __init__(self, app, keys: KeyTable | None):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.keys is None or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        token = bearer_token(_header(scope, b"authorization"))
        if token is None:
            message, code = "missing API key: send 'Authorization: Bearer <key>'", "missing_api_key"
            return await _send_json(send, 401, error_body(401, message, code))
        who = self.keys.lookup(token)
        if who is None:
            return await _send_json(
                send, 401, error_body(401, "invalid API key", "invalid_api_key")
            )
        scope.setdefault("state", {})["principal"] = who
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app, max_body_bytes: int):
        self.app, self.limit = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None and length.isdecimal() and int(length) > self.limit:  # 0-9 only
            return await _send_json(send, 413, _too_large(self.limit))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client gone before the body arrived
            size += len(message.get("body", b""))
            if size > self.limit:
                return await _send_json(send, 413, _too_large(self.limit))
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class RequestMetrics:
    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})

        async def counted(message):
            if message["type"] == "http.response.start":
                label = state.get("adapter_label", UNKNOWN)
                self.metrics.requests.labels(label, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


class InternalErrors:
    """Any unexpected exception: logged once, answered 500 in OpenAI's shape if nothing was sent
    yet (a stream that already started is closed); the process keeps serving."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await _send_json(
                    send, 500, error_body(500, "internal server error", "internal_error")
                )
