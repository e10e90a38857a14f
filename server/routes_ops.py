"""Operations routes: `/health` (process alive) and `/ready`, open to all; `/metrics` (Prometheus
text), which needs an admin or metrics key when keys are configured (it names tenants' adapters).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .deps import Ctx, MetricsReader
from .openapi import responses
from .schemas import HealthStatus, ReadyStatus

router = APIRouter()


@router.get("/health")
async def health() -> HealthStatus:
    return HealthStatus(status="ok")


@router.get("/ready", response_model=ReadyStatus, responses={503: {"model": ReadyStatus}})
async def ready(ctx: Ctx):
    if ctx.draining:
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    if not ctx.engine.ready():
        return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ready", "model": ctx.engine.model_name}


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **responses(401, 403),
    },
)
async def metrics(ctx: Ctx, _: MetricsReader) -> Response:
    ctx.metrics.adapters_loaded.set(len(ctx.engine.adapters.loaded()))
    body, content_type = ctx.metrics.render()
    return Response(body, media_type=content_type)
