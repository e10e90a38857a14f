"""`GET /v1/models` (filtered per key) and the adapter admin routes `GET/POST/DELETE /v1/adapters`.

Adapters are named, never addressed by path: the engine's registry refuses anything that is not
a plain name, or a symlink out of the adapters dir (InvalidAdapterName -> 400).
The admin routes need an admin key when keys are configured.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter

from .deps import Admin, Caller, Ctx, ReadyCtx
from .schemas import AdapterCard, LoadAdapterRequest, ModelCard, ModelList

log = logging.getLogger(__name__)
router = APIRouter()


@router.get("/v1/models")
async def models(ctx: Ctx, who: Caller) -> ModelList:
    engine, created = ctx.engine, ctx.created
    cards = []
    if who.may_use(None):
        cards.append(ModelCard(id=engine.model_name, created=created))
    for info in engine.adapters.loaded():
        if who.may_use(info.name):
            cards.append(ModelCard(id=info.name, created=created, parent=engine.model_name))
    return ModelList(data=cards)


@router.get("/v1/adapters")
async def list_adapters(ctx: Ctx, _: Admin) -> dict:
    loaded = {a.name: a for a in ctx.engine.adapters.loaded()}
    names = sorted(set(ctx.engine.adapters.available()) | set(loaded))
    cards = [_card(name, loaded.get(name)) for name in names]
    return {"object": "list", "data": [c.model_dump() for c in cards]}


def _card(name: str, info) -> AdapterCard:
    if info is None:
        return AdapterCard(name=name, loaded=False)
    return AdapterCard(
        name=name,
        loaded=True,
        base_fingerprint=info.base_fingerprint,
        num_bytes=info.num_bytes,
        load_seconds=info.load_seconds,
    )


@router.post("/v1/adapters")
async def load_adapter(body: LoadAdapterRequest, ctx: ReadyCtx, _: Admin) -> AdapterCard:
    name = body.name
    info = await ctx.engine.adapters.load(name)  # InvalidAdapterName (a path) -> 400
    ctx.metrics.adapters_loaded.set(len(ctx.engine.adapters.loaded()))
    log.info("adapter %s loaded in %.3f s", name, info.load_seconds)
    return _card(info.name, info)


@router.delete("/v1/adapters/{name}")
async def unload_adapter(name: str, ctx: ReadyCtx, _: Admin) -> dict:
    await ctx.engine.adapters.unload(name)
    ctx.metrics.adapters_loaded.set(len(ctx.engine.adapters.loaded()))
    log.info("adapter %s unloaded", name)
    return {"name": name, "object": "adapter", "deleted": True}
