"""The FastAPI app factory: `create_app(engine, settings)` wires routes, errors, limits, metrics.

The app owns no model: it drives an `Engine` (server/protocol.py); with `start_engine` its
lifespan starts the engine's model thread and stops it at shutdown (`owq serve` instead runs the
model loop on the main thread itself). Each app has its own Prometheus registry, so several apps
(tests) can live in one process.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import protocol as p
from .deps import AppContext
from .errors import install_error_handlers
from .metrics import ServerMetrics
from .middleware import Authenticate, BodyLimit, InternalErrors, RequestMetrics
from .openapi import Limits, install_openapi
from .routes_admin import router as admin_router
from .routes_chat import router as chat_router
from .routes_completions import router as completions_router
from .routes_ops import router as ops_router
from .settings import ServerSettings

log = logging.getLogger(__name__)


def attach_observer(engine: p.Engine, observer: p.EngineObserver) -> None:
    """Hand the metrics to an engine built without them, if it can take an observer later."""
    setter = getattr(engine, "set_observer", None)
    if callable(setter):
        setter(observer)
    else:
        log.warning(
            "engine built without the app's metrics as observer: queue depth, batch "
            "size and adapter load time are not exported"
        )


async def preload_adapters(engine: p.Engine) -> None:
    """Load the adapters of the adapters dir, up to the registry's bound; one that is refused
    is logged with the reason and skipped (the others load on the first request naming them)."""
    room = engine.adapters.max_loaded - len(engine.adapters.loaded())
    for state in engine.adapters.states():
        if state.status == "refused":
            log.warning("adapter %s refused: %s", state.name, state.error)
        elif state.status == "loadable" and room > 0:
            try:
                info = await engine.adapters.load(state.name)
                room -= 1
                log.info("adapter %s loaded (%.2f s)", state.name, info.load_seconds)
            except p.EngineError as e:
                log.warning("adapter %s not loaded: %s", state.name, e)


def create_app(
    engine: p.Engine, settings: ServerSettings | None = None, metrics: ServerMetrics | None = None
) -> FastAPI:
    """`metrics`: the `ServerMetrics` the engine was built with as its observer; None makes a
    new one and offers it to the engine (`set_observer`) if the engine can take one."""
    settings = settings or ServerSettings()
    if metrics is None:
        metrics = ServerMetrics()
        attach_observer(engine, metrics)
    ctx = AppContext(engine, settings, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if settings.keys is None:
            log.warning(
                "no --api-keys file: the server is OPEN, every client may use every "
                "model and the admin routes"
            )
        else:
            log.info("API keys required (%d keys)", len(settings.keys))
        if settings.start_engine:
            engine.start()
        if settings.preload_adapters:
            await preload_adapters(engine)
        try:
            yield
        finally:
            ctx.draining = True
            if settings.start_engine:
                await engine.stop()
                log.info("engine stopped")

    app = FastAPI(title="owq", version="0.1.0", lifespan=lifespan)
    app.state.ctx = ctx
    limits = Limits(
        settings.max_n, settings.max_logprobs, settings.max_prompts, engine.max_context,
        len(engine.tokenizer),
    )  # fmt: skip
    install_openapi(app, limits)
    install_error_handlers(app, settings.retry_after_s)
    for router in (ops_router, completions_router, chat_router, admin_router):
        app.include_router(router)
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(Authenticate, keys=settings.keys)  # before the body is read
    app.add_middleware(InternalErrors)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: counts 413s and 500s too
    return app
