"""The OpenAPI document as the server really behaves: the error statuses each route returns (in
OpenAI's shape, 400 for invalid parameters, never FastAPI's 422), SSE next to JSON where a
route streams, `/metrics` as Prometheus text. Routes declare their statuses with `responses()`;
`install_openapi` drops what FastAPI adds on its own. Knows the schemas, not the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .schemas import ChatCompletionChunk, CompletionResponse, ErrorResponse

DESCRIPTIONS = {
    400: "Invalid parameters or body (OpenAI's invalid_request_error)",
    401: "Missing or unknown API key (when --api-keys is set)",
    403: "The API key may not use this model or route",
    404: "No such model or adapter",
    409: "The adapter is refused (another base, bad shape or values); the message says the fix",
    413: "The request body is larger than --max-body-bytes",
    429: "The queue is full: retry after Retry-After seconds",
    500: "This request failed in the model (non-finite logits); other requests are unaffected",
    503: "The engine is loading or shutting down: retry after Retry-After seconds",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds", "schema": {"type": "string"}}}
GENERATION = (400, 401, 403, 404, 409, 413, 429, 500, 503)
REF_PREFIX = "#/components/schemas/"


def responses(*statuses: int) -> dict:
    """FastAPI `responses=` for these error statuses, each with OpenAI's error body."""
    out: dict = {}
    for status in statuses:
        out[status] = {"model": ErrorResponse, "description": DESCRIPTIONS[status]}
        if status in (429, 503):
            out[status]["headers"] = RETRY_AFTER
    return out


def streamed(model, chunk) -> dict:
    """The 200 of a route that answers `model` as JSON, or with `stream: true` SSE events whose
    data is a `chunk`, an error (after the stream started) or the final `[DONE]`."""
    data = {
        "anyOf": [
            {"type": "string", "const": "[DONE]"},
            {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorResponse)]},
            },
        ]
    }
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {200: {"model": model, "content": {"text/event-stream": {"schema": event}}}}


def _ref(model) -> dict:
    return {"$ref": f"{REF_PREFIX}{model.__name__}"}


def _add_models(schemas: dict, models) -> None:
    """Models the SSE events name, with the models they use, into components.schemas."""
    for model in models:
        schema = model.model_json_schema(ref_template=REF_PREFIX + "{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas.setdefault(model.__name__, schema)


@dataclass(frozen=True)
class Limits:
    """This server's own limits, written into the document's request schemas."""

    max_n: int
    max_logprobs: int
    max_prompts: int
    max_context: int
    vocab_size: int


def install_openapi(app: FastAPI, limits: Limits) -> None:
    """Serve the document without FastAPI's automatic 422 (validation errors answer 400), with
    this server's limits in the request schemas."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in doc.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = doc.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            _add_models(schemas, (ChatCompletionChunk, CompletionResponse, ErrorResponse))
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                write_limits(schemas[name]["properties"], limits)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


def write_limits(fields: dict, limits: Limits) -> None:
    """Maxima of n, logprobs, max_tokens, prompt batches and token ids, in place."""
    maxima = {
        "n": limits.max_n,
        "logprobs": limits.max_logprobs,
        "top_logprobs": limits.max_logprobs,
        "max_tokens": limits.max_context,
        "max_completion_tokens": limits.max_context,
    }
    for name, maximum in maxima.items():
        for schema in _alternatives(fields.get(name, {})):
            if schema.get("type") == "integer":
                schema["maximum"] = maximum
    for schema in _alternatives(fields.get("prompt", {})):
        if schema.get("type") != "array":
            continue
        items = schema["items"]
        if items.get("type") == "integer":  # one prompt of token ids
            items["maximum"] = limits.vocab_size - 1
            continue
        schema["maxItems"] = limits.max_prompts  # a batch of prompts
        if items.get("type") == "array":
            items["items"]["maximum"] = limits.vocab_size - 1


def _alternatives(schema: dict) -> list[dict]:
    return schema.get("anyOf", [schema])
