"""Which engine replica serves each request, and the answers that need every replica.

HAProxy (`ray_env.py`) asks the `Router` deployment once per POST, with its body and its
X-OWQ-Adapter header: the adapter the request names (the header, else the JSON body's `model`
field, as the app reads it) is Ray's multiplexed model id, so the pick is a replica that holds
it (or, with `--ray-routing round-robin`, each replica in turn: `RoundRobin`). HAProxy then
sends the request to that replica's own HTTP port, and its tokens stream back without passing
through Python here. The rest is answered by a replica for all of them (`cluster_answer`):
`/ready` (ready when one is, `X-OWQ-Replicas` names them), `/metrics` (every replica's page,
each sample labelled with its `replica`) and adapter changes (`POST`/`DELETE /v1/adapters...`,
on every replica). Knows no engine and no tensors.
"""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import FastAPI, HTTPException, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Sample
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.request_router import RequestRouter
from starlette.responses import Response

from .adapter_registry import NAME_RE, adapter_name
from .errors import ApiError, error_response
from .generation import ADAPTER_HEADER
from .ray_asgi import HttpRequest, HttpResponse

log = logging.getLogger(__name__)

GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
ADAPTER_CHANGES = "/v1/adapters"
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
RETRY_AFTER_S = 1
CLUSTER_TIMEOUT_S = 30  # for every replica's answer to /ready, /metrics, an adapter change
PICK_TIMEOUT_S = 4  # HAProxy gives the router 5 s, then answers 503 itself
ROUTE_PATH = "/internal/route"  # what HAProxy asks (Ray's contract for an ingress router)
MULTIPLEXED_HEADER = "serve_multiplexed_model_id"  # the pick's adapter, set by HAProxy


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


def is_cluster_path(method: str, path: str) -> bool:
    """Whether a request is answered for every replica (`cluster_answer`), not by one."""
    if method == "GET":
        return path in ("/metrics", "/ready")
    return method in ("POST", "DELETE") and path.startswith(ADAPTER_CHANGES)


async def cluster_answer(replicas, req: HttpRequest) -> Response:
    """The answer to a cluster path (`is_cluster_path`) from every running replica of the
    `replicas` handle (their `respond`)."""
    try:
        broadcast = replicas.broadcast("respond", req)
        results = await asyncio.wait_for(
            broadcast.results_async(return_exceptions=True), CLUSTER_TIMEOUT_S
        )
    except REPLICA_LOST as e:
        return replica_lost(type(e).__name__)
    except TimeoutError:
        return replica_lost(f"not every replica answered in {CLUSTER_TIMEOUT_S} s")
    answers = [r for r in results if isinstance(r, HttpResponse)]
    if not answers:
        reasons = {type(r).__name__ for r in results} or {"no replica is running yet"}
        return replica_lost(", ".join(sorted(reasons)))
    if req.path == "/ready":  # ready when a replica is
        ready = [a for a in answers if a.status == 200]
        return with_replicas(ready[0], ready) if ready else as_response(answers[0])
    refused = [a for a in answers if a.status >= 300]
    if refused:
        return as_response(refused[0])
    if req.path == "/metrics":
        merged = merge_metrics({a.replica: a.body.decode() for a in answers})
        return with_replicas(HttpResponse(200, [], merged), answers, CONTENT_TYPE_LATEST)
    return with_replicas(answers[0], answers)  # an adapter change: the first answer


class Router:
    """The ingress request router deployment: `replicas` is the handle of the `EngineReplica`
    deployment, whose own request router (Ray's multiplexed one, or `RoundRobin`) picks."""

    def __init__(self, replicas, base_name: str, multiplexed: bool):
        self.replicas = replicas
        self.base_name = base_name
        self.multiplexed = multiplexed
        replicas._init()  # its request router starts on this replica's loop

    def __serve_build_asgi_app__(self):
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        app.add_api_route(ROUTE_PATH, self.route, methods=["POST"])
        return app

    async def route(self, request: Request) -> dict:
        """Ray's router contract: the replica's HTTP endpoint for the request whose body and
        adapter header HAProxy forwards; `request_headers` are added to the request (the
        adapter, so that the replica holds it in Ray's multiplexing LRU)."""
        body = await request.body()
        req = HttpRequest("POST", GENERATE_PATHS[0], b"", tuple(request.headers.raw), body)
        adapter = adapter_of(req, self.base_name)
        handle = self.replicas
        if adapter and self.multiplexed:
            handle = handle.options(multiplexed_model_id=adapter)
        # Multiplexed: reserving a slot asks the replica for its queue now, where the pick
        # would read a count cached for up to 10 s (measured: fewer adapter loads). Round-
        # robin reads no queue, and one pick per request keeps its turns.
        try:
            name, endpoint = await asyncio.wait_for(
                pick(handle, reserve=self.multiplexed), PICK_TIMEOUT_S
            )
        except (TimeoutError, *REPLICA_LOST) as e:  # HAProxy answers 503 for any refusal
            raise HTTPException(503, f"no replica: {type(e).__name__}") from None
        if endpoint is None:
            raise HTTPException(503, f"replica {name} has no HTTP endpoint")
        route = {"host": endpoint[0], "port": endpoint[1], "replica_id": name}
        if adapter:
            route["request_headers"] = {MULTIPLEXED_HEADER: adapter}
        return route


async def pick(handle, reserve: bool) -> tuple[str, tuple[str, int] | None]:
    """(replica id, its HTTP endpoint) that the deployment's request router picks."""
    async with handle.choose_replica(_reserve=reserve) as picked:
        replica = picked._replica
        return replica.replica_id.to_full_id_str(), replica.backend_http_endpoint


def with_replicas(
    found: HttpResponse, answers: list[HttpResponse], media_type: str | None = None
) -> Response:
    """`found` as a response naming the replicas that answered (`x-owq-replicas`)."""
    response = as_response(found)
    if media_type is not None:
        response.headers["content-type"] = media_type
    response.headers["x-owq-replicas"] = ",".join(sorted(a.replica for a in answers))
    return response


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
