"""A Ray Serve replica of the owq server: one engine and its FastAPI app, in one Ray actor.

`EngineReplica(spec)` builds the engine (`Engine.from_checkpoint`) and the app (`create_app`:
the same routes, errors, limits, tenancy and metrics as `owq serve`), starts the engine's model
thread and answers the router (`ray_router.py`): `forward` streams the app's response to one
request, `respond` returns a whole one (the router broadcasts `/metrics` and adapter changes
to every replica). Both add `X-OWQ-Replica`, this replica's id. The adapter a request names is
Ray's multiplexed model id: `forward` hands it to the `@serve.multiplexed` loader first, which
loads it into the engine's adapter registry and tells Ray's router that this replica holds it;
when Ray's LRU (`--ray-max-adapters-per-replica`) evicts it, it is unloaded from the registry
too, so what the router believes a replica holds is what it holds. Knows no routing policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch
from ray import serve

from .app import create_app
from .auth import bearer_token
from .engine import Engine, EngineConfig
from .metrics import ServerMetrics
from .protocol import EngineError
from .ray_asgi import HttpRequest, HttpResponse, respond, run_asgi
from .settings import ServerSettings

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-owq-replica"
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
        self.app = create_app(self.engine, spec.settings, metrics)
        self._start_model_loop(spec.threads)
        if not self.engine.wait_ready(READY_TIMEOUT_S):
            raise RuntimeError(f"the engine was not ready after {READY_TIMEOUT_S} s")
        self.replica = serve.get_replica_context().replica_id.unique_id
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

    async def forward(self, request: HttpRequest, adapter: str = "") -> AsyncIterator[dict]:
        """The app's ASGI messages for `request`, which names `adapter` ('' = the base); the
        start message carries X-OWQ-Replica. The adapter goes through Ray's multiplexed loader
        whether or not the router routed by it, so both routings hold adapters alike."""
        await self._hold(adapter, request)
        async for message in run_asgi(self.app, request):
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), self._replica_header()]
                message = {**message, "headers": headers}
            yield message

    async def respond(self, request: HttpRequest) -> HttpResponse:
        response = await respond(self.app, request)
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
