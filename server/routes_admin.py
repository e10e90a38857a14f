"""`GET /v1/models[/{id}]` (filtered per key) and the admin routes `GET/POST/DELETE /v1/adapters`.

Models are the base and every adapter a caller may use, loaded or loadable (loaded by the first
request naming it). Adapters are named, never addressed by path: the engine's registry refuses
anything that is not a plain name, or a symlink out of the adapters dir (InvalidAdapterName ->
400). The admin routes need an admin key when keys are configured; `GET /v1/adapters` says why
a refused adapter cannot be used.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path

from . import protocol as p
from .deps import Admin, Caller, Ctx, ReadyCtx
from .errors import ApiError
from .openapi import responses
from .schemas import (
    AdapterCard,
    AdapterDeleted,
    AdapterList,
    LoadAdapterRequest,
    ModelCard,
    ModelList,
)

log = logging.getLogger(__name__)
router = APIRouter()


def model_cards(ctx, who) -> list[ModelCard]:
    engine, created = ctx.engine, ctx.created
    cards = []
    if who.may_use(None):
        cards.append(ModelCard(id=engine.model_name, created=created))
    for state in engine.adapters.states():
        if state.status != "refused" and who.may_use(state.name):
            cards.append(ModelCard(
                id=state.name, created=created, parent=engine.model_name, status=state.status
            ))  # fmt: skip
    return cards


@router.get("/v1/models", responses=responses(401))
async def models(ctx: Ctx, who: Caller) -> ModelList:
    return ModelList(data=model_cards(ctx, who))


@router.get("/v1/models/{model_id}", responses=responses(401, 404))
async def model(model_id: str, ctx: Ctx, who: Caller) -> ModelCard:
    for card in model_cards(ctx, who):
        if card.id == model_id:
            return card
    raise ApiError(404, f"model {p.shown(model_id)} does not exist", "model_not_found", "model")


@router.get("/v1/adapters", responses=responses(401, 403))
async def list_adapters(ctx: Ctx, _: Admin) -> AdapterList:
    return AdapterList(data=[_card(s) for s in ctx.engine.adapters.states()])


def _card(state: p.AdapterState) -> AdapterCard:
    info = state.info
    return AdapterCard(
        name=state.name, loaded=state.status == "loaded", status=state.status, error=state.error,
        base_fingerprint=info.base_fingerprint if info else None,
        num_bytes=info.num_bytes if info else None,
        load_seconds=info.load_seconds if info else None,
    )  # fmt: skip


@router.post("/v1/adapters", responses=responses(400, 401, 403, 404, 409, 413, 503))
async def load_adapter(body: LoadAdapterRequest, ctx: ReadyCtx, _: Admin) -> AdapterCard:
    info = await ctx.engine.adapters.load(body.name)  # InvalidAdapterName (a path) -> 400
    log.info("adapter %s loaded in %.3f s", info.name, info.load_seconds)
    return _card(p.AdapterState(info.name, "loaded", info))


@router.delete("/v1/adapters/{name}", responses=responses(400, 401, 403, 404, 503))
async def unload_adapter(
    name: Annotated[str, Path(pattern=p.ADAPTER_NAME_PATTERN)], ctx: ReadyCtx, _: Admin
) -> AdapterDeleted:
    await ctx.engine.adapters.unload(name)
    log.info("adapter %s unloaded", name)
    return AdapterDeleted(name=name)
