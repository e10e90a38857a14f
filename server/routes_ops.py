"""Operations routes, open to all: `/health` (process alive), `/ready`, `/metrics` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from .deps import Ctx

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(ctx: Ctx):
    if ctx.draining:
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    if not ctx.engine.ready():
        return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ready", "model": ctx.engine.model_name}


@router.get("/metrics")
async def metrics(ctx: Ctx) -> Response:
    ctx.metrics.adapters_loaded.set(len(ctx.engine.adapters.loaded()))
    body, content_type = ctx.metrics.render()
    return Response(body, media_type=content_type)
