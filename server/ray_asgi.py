"""One HTTP request run through an ASGI app in this process, as plain picklable values.

Under Ray Serve a replica that answers for all replicas (`ray_router.cluster_answer`) reads the
request (`read_request`) and hands every replica an `HttpRequest` (method, path, headers,
body); each runs it through its own FastAPI app (`server/app.py`, unchanged): `run_asgi` yields
the app's ASGI messages as they are sent, `respond` collects them into one `HttpResponse`.
Closing the iterator tells the app the client left. Knows ASGI, not Ray, routes or the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    query: bytes = b""
    headers: Headers = ()
    body: bytes = b""
    client: tuple[str, int] | None = None

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), decoded as latin-1."""
        key = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == key:
                return v.decode("latin-1")
        return None


@dataclass
class HttpResponse:
    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    replica: str = ""


async def read_request(scope: dict, receive, max_body_bytes: int) -> HttpRequest:
    """An ASGI HTTP request as plain values; a body past the limit is cut one byte after it
    (the app answers 413, by its Content-Length or by the bytes)."""
    body = bytearray()
    while len(body) <= max_body_bytes:
        message = await receive()
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    client = tuple(scope["client"]) if scope.get("client") else None
    return HttpRequest(
        scope["method"], scope["path"], scope.get("query_string", b""),
        tuple(scope["headers"]), bytes(body[: max_body_bytes + 1]), client,
    )  # fmt: skip


def scope_of(request: HttpRequest) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query,
        "root_path": "",
        "headers": [(k.lower(), v) for k, v in request.headers],
        "client": request.client,
        "server": ("replica", 0),
        "state": {},
    }


async def run_asgi(app, request: HttpRequest) -> AsyncIterator[dict]:
    """The ASGI messages `app` sends for `request`, as it sends them. The body is received in
    one message; closing this iterator early is a client disconnect."""
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    task = asyncio.ensure_future(app(scope_of(request), receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            yield message
        task.result()
    finally:
        gone.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def respond(app, request: HttpRequest) -> HttpResponse:
    """The whole response of `app` to `request`."""
    response = HttpResponse(500)
    chunks = []
    async for message in run_asgi(app, request):
        if message["type"] == "http.response.start":
            response.status = message["status"]
            response.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
    response.body = b"".join(chunks)
    return response
