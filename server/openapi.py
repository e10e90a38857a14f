"""The OpenAPI document as the server really behaves: the error statuses each route returns (in
OpenAI's shape, 400 for invalid parameters, never FastAPI's 422), SSE next to JSON where a
route streams, `/metrics` as Prometheus text. Routes declare their statuses with `responses()`;
`install_openapi` drops what FastAPI adds on its own. Knows the schemas, not the engine.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .schemas import ErrorResponse

DESCRIPTIONS = {
    400: "Invalid parameters or body (OpenAI's invalid_request_error)",
    401: "Missing or unknown API key (when --api-keys is set)",
    403: "The API key may not use this model or route",
    404: "No such model or adapter",
    409: "The adapter is refused (another base, bad shape or values); the message says the fix",
    413: "The request body is larger than --max-body-bytes",
    429: "The queue is full, or every loaded adapter is in use: retry after Retry-After seconds",
    500: "This request failed in the model (non-finite logits); other requests are unaffected",
    503: "The engine is loading or shutting down: retry after Retry-After seconds",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds", "schema": {"type": "string"}}}
GENERATION = (400, 401, 403, 404, 409, 413, 429, 500, 503)


def responses(*statuses: int) -> dict:
    """FastAPI `responses=` for these error statuses, each with OpenAI's error body."""
    out: dict = {}
    for status in statuses:
        out[status] = {"model": ErrorResponse, "description": DESCRIPTIONS[status]}
        if status in (429, 503):
            out[status]["headers"] = RETRY_AFTER
    return out


def streamed(model) -> dict:
    """The 200 of a route that answers JSON, or SSE with `stream: true`."""
    sse = {"schema": {"type": "string"}, "description": "data: <chunk JSON> events, then [DONE]"}
    return {200: {"model": model, "content": {"text/event-stream": sse}}}


def install_openapi(app: FastAPI) -> None:
    """Serve the document without FastAPI's automatic 422 (validation errors answer 400)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in doc.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = doc.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
