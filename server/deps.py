"""Per-app state and the FastAPI dependencies of the routes: context, readiness, principal.

`AppContext` is what `create_app` stores on `app.state.ctx`: the engine, the settings, the
metrics and a draining flag set at shutdown. Knows the protocol and the key table, nothing of
tensors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from . import protocol as p
from .auth import OPEN, Principal
from .errors import ApiError
from .metrics import ServerMetrics
from .settings import ServerSettings


@dataclass
class AppContext:
    engine: p.Engine
    settings: ServerSettings
    metrics: ServerMetrics
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def context(request: Request) -> AppContext:
    return request.app.state.ctx


def ready_context(request: Request) -> AppContext:
    """The context of an app that takes work: 503 while loading or shutting down."""
    ctx = context(request)
    headers = {"Retry-After": str(ctx.settings.retry_after_s)}
    if ctx.draining:
        raise ApiError(503, "the server is shutting down", "shutting_down", headers=headers)
    if not ctx.engine.ready():
        raise ApiError(503, "the engine is not ready yet", "not_ready", headers=headers)
    return ctx


def principal(request: Request) -> Principal:
    """The caller: OPEN without a key table, else the principal `middleware.Authenticate` found
    for its key (checked before the body was read)."""
    if context(request).settings.keys is None:
        return OPEN
    who = getattr(request.state, "principal", None)
    if who is None:  # a route left open by the middleware cannot name a caller
        raise ApiError(
            401, "missing API key: send 'Authorization: Bearer <key>'", "missing_api_key"
        )
    return who


def admin(who: Annotated[Principal, Depends(principal)]) -> Principal:
    if not who.admin:
        raise ApiError(403, "this route needs an admin API key", "admin_required")
    return who


def metrics_reader(who: Annotated[Principal, Depends(principal)]) -> Principal:
    if not who.reads_metrics:
        raise ApiError(403, "/metrics needs an admin or metrics API key", "metrics_key_required")
    return who


Ctx = Annotated[AppContext, Depends(context)]
ReadyCtx = Annotated[AppContext, Depends(ready_context)]
Caller = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(admin)]
MetricsReader = Annotated[Principal, Depends(metrics_reader)]
