"""Pure ASGI middleware: a request-body size limit (413) and per-request status metrics.

`BodyLimit` reads at most `max_body_bytes` of a request body (rejecting early on a large
Content-Length) and replays it to the app, so nothing downstream sees an oversized body.
`RequestMetrics` counts each generation request by adapter and status when its response starts
(the route names the adapter on `request.state.adapter_label`; "-" before it is known).
`InternalErrors` turns an unexpected exception into one logged traceback and a 500.
"""

from __future__ import annotations

import json
import logging

from .errors import error_body
from .metrics import UNKNOWN, ServerMetrics

log = logging.getLogger(__name__)
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _too_large(limit: int) -> dict:
    return error_body(413, f"request body exceeds {limit} bytes", "request_too_large")


class BodyLimit:
    def __init__(self, app, max_body_bytes: int):
        self.app, self.limit = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
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
