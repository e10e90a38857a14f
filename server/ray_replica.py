"""A Ray Serve replica of the owq server: one engine and its FastAPI app, in one Ray actor.

`EngineReplica(spec)` builds the engine (`Engine.from_checkpoint`) and the app (`create_app`:
the same routes, errors, limits, tenancy and metrics as `owq serve`) and starts the engine's
model thread. The replica is its own HTTP ingress (`serve.ingress`, Ray's direct ingress
behind HAProxy, `ray_env.py`): `ingress` runs each request through the app and adds
`X-OWQ-Replica`, this replica's id. The paths that need every replica (`/ready`, `/metrics`,
adapter changes) it answers for all of them (`ray_router.cluster_answer`), calling each
replica's `respond`. The adapter the router picked this replica for arrives as Ray's
multiplexed model id header: the `@serve.multiplexed` loader loads it into the engine's
adapter registry and tells Ray's router that this replica holds it; when Ray's LRU
(`--ray-max-adapters-per-replica`) evicts it, it is unloaded from the registry too, so what
the router believes a replica holds is what it holds. Knows no routing policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from ray import serve

from .app import create_app
from .auth import bearer_token
from .engine import Engine, EngineConfig
from .metrics import ServerMetrics
from .protocol import EngineError
from .ray_asgi import HttpRequest, HttpResponse, read_request, respond
from .ray_router import MULTIPLEXED_HEADER, cluster_answer, is_cluster_path
from .settings import ServerSettings

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-owq-replica"
CLUSTER_ANSWERS = 4  # answers for all replicas a replica works on at once (more wait)
# Request slots kept for them: each holds one while its broadcast needs one on every replica,
# this one included; the rest serve the broadcasts of other replicas (`ray_serve.py`).
CLUSTER_SLOTS = 2 * CLUSTER_ANSWERS
READY_TIMEOUT_S = 600  # the warm-up builds fused weights: seconds on a loaded machine


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica builds: the same checkpoint, adapters dir and settings."""

    ckpt: Path
    adapters: Path | None
    model_name: str | None
    engine: EngineConfig
    settings: ServerSettings
    threads: int  # torch threads of the model loop (the replica's CPUs)


async def unload_quietly(adapters, name: str) -> None:
    with contextlib.suppress(EngineError):  # already gone (unloaded by an admin, evicted)
        await adapters.unload(name)


class HeldAdapter:
    """What Ray's multiplexing LRU keeps for one adapter. Ray calls `__del__` when it evicts
    the adapter (from a worker thread): the adapter is then unloaded from the registry on the
    replica's event loop. Requests already running keep their weights."""

    def __init__(self, name: str, adapters, loop: asyncio.AbstractEventLoop):
        self.name, self._adapters, self._loop = name, adapters, loop
        self._released = False

    def __del__(self) -> None:
        if self._released:
            return
        self._released = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: the replica is gone
            self._loop.call_soon_threadsafe(self._unload)

    def _unload(self) -> None:
        asyncio.ensure_future(unload_quietly(self._adapters, self.name))


class EngineReplica:
    """The deployment class (`ray_serve.build_application` wraps it in `serve.deployment`)."""

    def __init__(self, spec: ReplicaSpec):
        metrics = ServerMetrics()
        self.engine = Engine.from_checkpoint(
            spec.ckpt, spec.engine, spec.adapters, metrics, spec.model_name
        )
        self.keys = spec.settings.keys
        self.max_body_bytes = spec.settings.max_body_bytes
        self.http_app = create_app(self.engine, spec.settings, metrics)
        self._start_model_loop(spec.threads)
        if not self.engine.wait_ready(READY_TIMEOUT_S):
            raise RuntimeError(f"the engine was not ready after {READY_TIMEOUT_S} s")
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._handle = None
        self._cluster_answers = asyncio.Semaphore(CLUSTER_ANSWERS)
        held = spec.engine.max_loaded_adapters  # Ray's LRU bound is the registry's
        self.adapter = serve.multiplexed(max_num_models_per_replica=held)(self._loader())
        log.info("replica %s ready: %s, %d threads", self.replica, spec.ckpt, spec.threads)

    def _start_model_loop(self, threads: int) -> None:
        """The engine's model loop on a thread of its own that sets torch's thread count
        itself: OpenMP keeps the count per thread, and a thread that never set it runs its
        GEMMs on one core (why `owq serve` keeps the loop on the main thread, which a Ray
        actor does not offer)."""

        def model_loop() -> None:
            torch.set_num_threads(threads)
            self.engine.run_forever()

        threading.Thread(target=model_loop, name="owq-model", daemon=True).start()

    def _loader(self):
        adapters = self.engine.adapters

        async def load_adapter(name: str) -> HeldAdapter:
            await adapters.resolve(name)  # loads it unless it is loaded
            return HeldAdapter(name, adapters, asyncio.get_running_loop())

        return load_adapter

    def __serve_build_asgi_app__(self):
        """What Ray serves on this replica's HTTP port (called after `__init__`): a function,
        which uvicorn recognizes as an ASGI 3 app (a bound method it takes for ASGI 2)."""

        async def app(scope: dict, receive, send) -> None:
            await self.ingress(scope, receive, send)

        return app

    async def ingress(self, scope: dict, receive, send) -> None:
        """The app, with X-OWQ-Replica on every response; cluster paths answered for all
        replicas; the adapter the router picked this replica for held first."""
        if scope["type"] != "http":
            return await self.http_app(scope, receive, send)
        if is_cluster_path(scope["method"], scope["path"]):
            request = await read_request(scope, receive, self.max_body_bytes)
            async with self._cluster_answers:
                response = await cluster_answer(self._peers(), request)
            return await response(scope, receive, send)
        request = HttpRequest(scope["method"], scope["path"], headers=tuple(scope["headers"]))
        await self._hold(request.header(MULTIPLEXED_HEADER) or "", request)

        async def send_marked(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), self._replica_header()]
                message = {**message, "headers": headers}
            await send(message)

        await self.http_app(scope, receive, send_marked)

    async def respond(self, request: HttpRequest) -> HttpResponse:
        response = await respond(self.http_app, request)
        response.headers.append(self._replica_header())
        response.replica = self.replica
        return response

    def check_health(self) -> None:
        """Ray's health check: a replica whose model loop stopped is replaced."""
        if not self.engine.ready():
            raise RuntimeError("the engine's model loop is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.request_stop()

    # internals ----------------------------------------------------------------------------
    def _peers(self):
        """A handle on every replica of this deployment (this one included)."""
        if self._handle is None:
            context = serve.get_replica_context()
            self._handle = serve.get_deployment_handle(context.deployment, context.app_name)
        return self._handle

    def _replica_header(self) -> tuple[bytes, bytes]:
        return (REPLICA_HEADER.encode(), self.replica.encode())

    async def _hold(self, name: str, request: HttpRequest) -> None:
        """Hand the request's adapter to Ray's multiplexed loader (so Ray's router learns that
        this replica holds it) when the caller may use it; any refusal is left to the app,
        which answers it with the same status as `owq serve`."""
        if not name or not self._may_use(request, name):
            return
        try:
            await self.adapter(name)
        except EngineError as e:
            log.info("adapter %s not loaded for routing: %s", name, e)

    def _may_use(self, request: HttpRequest, name: str) -> bool:
        """Whether the request's key may use adapter `name` (no key table: everyone), so that
        a caller without the right key cannot make a replica load an adapter."""
        if self.keys is None:
            return True
        token = bearer_token(request.header("authorization"))
        who = self.keys.lookup(token) if token else None
        return who is not None and who.may_use(name)
