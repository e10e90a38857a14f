"""Adapters at engine level: names only, fingerprint checks, hot load/unload/replace while
requests run (they keep their weights), LRU over fewer slots than adapters."""

import asyncio
import os

import pytest
from engine_fixtures import (
    RecordingObserver,
    build_tiny_server_assets,
    collect,
    random_adapter,
    request,
    started_engine,
    token_ids,
    write_foreign_adapter,
)

from owq.kernels.adapters import save_adapter
from owq.kernels.checkpoint import load_checkpoint
from owq.server.protocol import (
    AdapterConflict,
    AdapterNotFound,
    AdapterNotLoaded,
    InvalidAdapterName,
)

PROMPT = "It is a truth universally acknowledged"


@pytest.fixture()
def assets(tmp_path):
    return build_tiny_server_assets(tmp_path, "llama", 4)


def test_path_like_names_are_refused(assets, tmp_path):
    ckpt, adapters = assets
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, adapters / "escape")
    os.symlink(adapters / "adapter-0", adapters / "alias")  # a link inside the dir is fine
    engine = started_engine(ckpt, adapters)

    async def main():
        for bad in ["../x", "/etc", "a/b", "..", ".hidden", "", "x" * 65, "escape"]:
            with pytest.raises(InvalidAdapterName):
                await engine.adapters.load(bad)
        with pytest.raises(AdapterNotFound):
            await engine.adapters.load("missing")
        assert (await engine.adapters.load("alias")).name == "alias"
        with pytest.raises(AdapterNotLoaded):
            await engine.adapters.unload("adapter-3")
        await engine.stop()

    asyncio.run(main())
    assert "escape" not in engine.adapters.available()
    assert {"adapter-0", "adapter-3", "alias"} <= set(engine.adapters.available())


def test_fingerprint_mismatch_names_both(assets):
    ckpt, adapters = assets
    write_foreign_adapter(adapters, "foreign")
    engine = started_engine(ckpt, adapters)

    async def main():
        with pytest.raises(AdapterConflict) as err:
            await engine.adapters.load("foreign")
        await engine.stop()
        return str(err.value)

    message = asyncio.run(main())
    assert engine.adapters.fingerprint in message
    assert engine.adapters.loaded() == []
    other = [w for w in message.replace(",", " ").split() if len(w) == 16 and w.isalnum()]
    assert len(set(other)) == 2  # the adapter's base and this base


def test_unknown_adapter_request_and_observer(assets):
    observer = RecordingObserver()
    engine = started_engine(*assets, observer=observer)

    async def main():
        with pytest.raises(AdapterNotLoaded):
            await collect(engine, request(engine, PROMPT, "adapter-0", max_tokens=3))
        info = await engine.adapters.load("adapter-0")
        assert info.num_bytes > 0 and info.base_fingerprint == engine.adapters.fingerprint
        await collect(engine, request(engine, PROMPT, "adapter-0", max_tokens=3))
        await collect(engine, request(engine, PROMPT, engine.model_name, max_tokens=3))
        await engine.adapters.unload("adapter-0")
        await engine.stop()

    asyncio.run(main())
    assert observer.adapter_calls[0][0] == 1 and observer.adapter_calls[0][1] >= 0
    assert observer.adapter_calls[-1] == (0, None)
    assert observer.steps and observer.steps[-1] == (0, 0)


def test_hot_load_unload_replace_during_generation(assets):
    """A running request keeps its weights while its adapter is unloaded and replaced; another
    adapter is loaded and used meanwhile without pausing it."""
    ckpt, adapters = assets
    engine = started_engine(ckpt, adapters, max_batch=4, num_slots=2)

    async def main():
        await engine.adapters.load("adapter-0")
        long = request(engine, PROMPT, "adapter-0", rid="long", max_tokens=60)
        ref_long = token_ids(await collect(engine, long))
        progress = asyncio.Event()
        task = asyncio.create_task(collect(engine, long, lambda i, _e: i >= 5 and progress.set()))
        await progress.wait()
        await engine.adapters.load("adapter-1")  # hot load while "long" runs
        ref_1 = token_ids(await collect(engine, request(engine, PROMPT, "adapter-1", max_tokens=8)))
        await engine.adapters.unload("adapter-0")
        with pytest.raises(AdapterNotLoaded):
            await collect(engine, request(engine, PROMPT, "adapter-0", max_tokens=3))
        replacement = random_adapter(load_checkpoint(ckpt), "adapter-0", seed=555)
        save_adapter(replacement, adapters / "adapter-0", overwrite=True)
        await engine.adapters.load("adapter-0")  # same name, new weights
        new = token_ids(await collect(engine, request(engine, PROMPT, "adapter-0", max_tokens=60)))
        in_flight = token_ids(await task)
        await engine.stop()
        return ref_long, in_flight, new, ref_1

    ref_long, in_flight, new, ref_1 = asyncio.run(main())
    assert in_flight == ref_long
    assert new != ref_long
    assert ref_1 != ref_long[: len(ref_1)]


def test_lru_over_fewer_slots_gives_same_outputs(assets):
    ckpt, adapters = assets
    names = [None, "adapter-0", "adapter-1", "adapter-2", "adapter-3"]

    def outputs(num_slots):
        engine = started_engine(ckpt, adapters, max_batch=4, num_slots=num_slots)

        async def main():
            for name in names[1:]:
                await engine.adapters.load(name)
            reqs = [
                request(engine, PROMPT[: 10 + 3 * i], names[i % 5], rid=str(i), max_tokens=12)
                for i in range(10)
            ]
            results = await asyncio.gather(*(collect(engine, r) for r in reqs))
            await engine.stop()
            return [token_ids(r) for r in results], engine.slots.writes

        return asyncio.run(main())

    plenty, writes_plenty = outputs(4)
    scarce, writes_scarce = outputs(1)
    assert plenty == scarce
    assert writes_plenty == 4 and writes_scarce >= 4  # one slot: 3+ evictions
    assert len({tuple(o) for o in plenty[:5]}) == 5  # the adapters do differ
