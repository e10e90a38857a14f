"""The Ray Serve ingress: routes each HTTP request to an engine replica by the adapter it names.

Ray's HTTP proxy routes by a header only, while OpenAI clients name the adapter in the body's
`model` field; this ingress reads the request once, takes its adapter (`X-OWQ-Adapter`, else
the `model` field, as the app does) as Ray's multiplexed model id, and relays the chosen
replica's response as it streams (`EngineReplica.forward`). Everything else (validation, auth,
errors, metrics) is the replica's own app. A replica lost before its response started answers
503 with Retry-After; `/ready` answers for every running replica (ready when one is,
`X-OWQ-Replicas` names them); `/metrics` is every replica's page, each sample labelled with its
`replica`; adapter changes (`POST`/`DELETE /v1/adapters...`) go to every replica. `RoundRobin`
is the Ray request router of the adapter-blind baseline. Knows no engine and no tensors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Sample
from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.request_router import RequestRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .adapter_registry import NAME_RE, adapter_name
from .errors import ApiError, error_body, error_response
from .generation import ADAPTER_HEADER
from .ray_asgi import HttpRequest, HttpResponse

log = logging.getLogger(__name__)

GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
ADAPTER_CHANGES = "/v1/adapters"
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
RETRY_AFTER_S = 1


def adapter_of(request: HttpRequest, base_name: str) -> str:
    """The adapter a request names, '' for the base: the X-OWQ-Adapter header, else the JSON
    body's `model` field (a name the app would refuse routes like the base: it answers)."""
    name = (request.header(ADAPTER_HEADER) or "").strip()
    if not name and request.method == "POST" and request.path in GENERATE_PATHS:
        name = model_field(request.body)
    adapter = adapter_name(name, base_name)
    return adapter if adapter is not None and NAME_RE.fullmatch(adapter) else ""


def model_field(body: bytes) -> str:
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return ""
    return model.strip() if isinstance(model, str) else ""


def replica_lost(reason: str) -> Response:
    message = f"the replica serving this request is gone ({reason}); retry it"
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    return error_response(ApiError(503, message, "replica_unavailable", headers=headers))


def as_response(found: HttpResponse) -> Response:
    response = Response(found.body, status_code=found.status)
    length = [(k, v) for k, v in response.raw_headers if k == b"content-length"]
    response.raw_headers = [h for h in found.headers if h[0].lower() != b"content-length"]
    response.raw_headers += length
    return response


async def http_request(request: Request, max_body_bytes: int) -> HttpRequest:
    """The request as plain values; a body past the limit is cut one byte after it (the
    replica's app answers 413, by its Content-Length or by the bytes)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            break
    client = tuple(request.client) if request.client else None
    return HttpRequest(
        request.method, request.url.path, request.url.query.encode(),
        tuple(request.headers.raw), bytes(body[: max_body_bytes + 1]), client,
    )  # fmt: skip


class Router:
    """The ingress deployment: `replicas` is the handle of the `EngineReplica` deployment."""

    def __init__(self, replicas, base_name: str, multiplexed: bool, max_body_bytes: int):
        self.replicas = replicas
        self.base_name = base_name
        self.multiplexed = multiplexed
        self.max_body_bytes = max_body_bytes

    async def __call__(self, request: Request) -> Response:
        req = await http_request(request, self.max_body_bytes)
        if req.path == "/metrics" and req.method == "GET":
            return await self.scrape(req)
        if req.path == "/ready" and req.method == "GET":
            return await self.ready(req)
        if req.path.startswith(ADAPTER_CHANGES) and req.method in ("POST", "DELETE"):
            return await self.everywhere(req)
        adapter = adapter_of(req, self.base_name)
        handle = self.replicas.options(
            method_name="forward",
            stream=True,
            multiplexed_model_id=adapter if self.multiplexed else "",
        )
        return await relay(handle.remote(req, adapter))

    async def ready(self, req: HttpRequest) -> Response:
        """Ready when a replica is; `x-owq-replicas` names every ready replica."""
        answers = await self._answers(req)
        if isinstance(answers, Response):
            return answers
        ready = [a for a in answers if a.status == 200]
        return with_replicas(ready[0], ready) if ready else as_response(answers[0])

    async def scrape(self, req: HttpRequest) -> Response:
        """Every replica's /metrics (with the caller's key), samples labelled by replica."""
        answers = await self._answers(req)
        if isinstance(answers, Response):
            return answers
        if refused := [a for a in answers if a.status != 200]:
            return as_response(refused[0])
        merged = merge_metrics({a.replica: a.body.decode() for a in answers})
        return with_replicas(HttpResponse(200, [], merged), answers, CONTENT_TYPE_LATEST)

    async def everywhere(self, req: HttpRequest) -> Response:
        """An adapter change on every replica: the first refusal, else the first answer."""
        answers = await self._answers(req)
        if isinstance(answers, Response):
            return answers
        refused = [a for a in answers if a.status >= 300]
        return as_response(refused[0]) if refused else with_replicas(answers[0], answers)

    async def _answers(self, req: HttpRequest) -> list[HttpResponse] | Response:
        """Every running replica's answer to `req`, or 503 when none answers."""
        results = await self.replicas.broadcast("respond", req).results_async(
            return_exceptions=True
        )
        answers = [r for r in results if isinstance(r, HttpResponse)]
        if not answers:
            reasons = {type(r).__name__ for r in results} or {"no replica is running yet"}
            return replica_lost(", ".join(sorted(reasons)))
        return answers


def with_replicas(
    found: HttpResponse, answers: list[HttpResponse], media_type: str | None = None
) -> Response:
    """`found` as a response naming the replicas that answered (`x-owq-replicas`)."""
    response = as_response(found)
    if media_type is not None:
        response.headers["content-type"] = media_type
    response.headers["x-owq-replicas"] = ",".join(sorted(a.replica for a in answers))
    return response


async def relay(stream) -> Response:
    """The replica's response as it streams; 503 + Retry-After if the replica is lost (or
    overloaded) before the response started."""
    try:
        start = await anext(stream)
    except REPLICA_LOST + (BackPressureError,) as e:
        log.warning("replica lost before the response started: %s", type(e).__name__)
        return replica_lost(type(e).__name__)
    except (RayError, StopAsyncIteration) as e:
        log.error("replica failed: %s", e)
        body = error_body(500, f"internal error in a replica ({type(e).__name__})", "internal")
        return Response(json.dumps(body), 500, media_type="application/json")
    response = StreamingResponse(body_of(stream, start))
    response.status_code = start["status"]
    response.raw_headers = list(start.get("headers", []))
    return response


async def body_of(stream, start: dict) -> AsyncIterator[bytes]:
    """The body chunks; a replica lost mid-stream ends an event stream with an error event."""
    events = any(k.lower() == b"content-type" and b"event-stream" in v for k, v in start["headers"])
    try:
        async for message in stream:
            if message["type"] == "http.response.body" and message.get("body"):
                yield message["body"]
    except REPLICA_LOST as e:
        log.warning("replica lost mid-response: %s", type(e).__name__)
        if events:
            message = "the replica serving this stream is gone; retry the request"
            error = error_body(503, message, "replica_unavailable")
            yield f"data: {json.dumps(error)}\n\n".encode()
    finally:
        stream.cancel()


class RoundRobin(RequestRouter):
    """Ray request router for `--ray-routing round-robin`: each request to the next replica in
    turn (ordered by id), blind to adapters and to load: the baseline that multiplexed
    routing is measured against."""

    def initialize_state(self, **kwargs) -> None:
        self.turn = 0

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        self.turn += 1
        return [[ordered[self.turn % len(ordered)]]] if ordered else []


def merge_metrics(pages: dict[str, str]) -> bytes:
    """Prometheus text pages of several replicas as one page, each sample with a `replica`
    label (families of the same name merged)."""
    families: dict[str, object] = {}
    for replica, text in sorted(pages.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, family)
            labelled = [
                Sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            ]
            merged.samples = labelled if merged is family else merged.samples + labelled
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families:
    """A collector that yields parsed metric families as they are."""

    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return self.families
