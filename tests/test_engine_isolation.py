"""One request cannot hurt another: a row whose logits are not finite or whose draw fails ends
alone (GenerationFailed), the batch goes on with the same tokens, and the failed row's cache is
cleaned before the next request uses it. Parameters that cannot be sampled are refused up front.
The fault is real: a NaN written into the runtime's rotary table at one position, which only a
request that reaches that position reads."""

import asyncio

import pytest
import torch
from engine_fixtures import (
    build_tiny_server_assets,
    collect,
    random_adapter,
    request,
    started_engine,
    token_ids,
)

from owq.kernels.adapters import save_adapter
from owq.kernels.checkpoint import load_checkpoint
from owq.server.detokenize import TextStream
from owq.server.protocol import AdapterConflict, GenerationFailed, InvalidRequest, SamplingParams
from owq.server.scheduler import Sequence

PROMPT = "It is a truth universally acknowledged"
POISONED = 60  # rotary position made NaN: requests that reach it fail, shorter ones never read it


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_server_assets(tmp_path_factory.mktemp("iso"), "llama", 1)


@pytest.fixture()
def engine(assets):
    eng = started_engine(*assets, max_batch=4)
    yield eng
    asyncio.run(eng.stop())


def poison(engine, position: int):
    """NaN into the cos table at `position`; returns a function that restores it."""
    saved = engine.runtime.cos[position].clone()
    engine.runtime.cos[position] = float("nan")
    return lambda: engine.runtime.cos[position].copy_(saved)


async def outcome(engine, req):
    try:
        return token_ids(await collect(engine, req))
    except GenerationFailed as e:
        return e


@pytest.mark.parametrize("tiny", [1e-300, 1e-38, 1e-3, 0.0099])
def test_temperatures_that_cannot_be_sampled_are_refused(engine, tiny):
    with pytest.raises(InvalidRequest, match="temperature"):
        engine.check_request(request(engine, PROMPT, temperature=tiny))


def test_non_finite_logits_fail_that_request_only(engine):
    short = request(engine, PROMPT, rid="short", max_tokens=8)  # ends before POISONED
    long = request(engine, PROMPT, rid="long", max_tokens=POISONED)
    alone = asyncio.run(outcome(engine, short))
    restore = poison(engine, POISONED)

    async def together():
        return await asyncio.gather(*(outcome(engine, r) for r in (long, short, long)))

    failed, kept, failed_again = asyncio.run(together())
    restore()
    assert isinstance(failed, GenerationFailed) and "non-finite" in str(failed)
    assert isinstance(failed_again, GenerationFailed)
    assert kept == alone
    assert asyncio.run(outcome(engine, long)) == asyncio.run(outcome(engine, long))  # served on


def test_a_failed_rows_cache_is_cleaned_for_the_next_request(engine):
    """Stale NaN keys in a freed cache row would reach its next occupant through attention
    (masked positions still multiply: 0 * NaN = NaN) once a longer row stretches the batch."""
    short = request(engine, PROMPT, rid="short", max_tokens=40)
    long = request(engine, PROMPT * 4, rid="long", max_tokens=4)  # its prompt passes POISONED
    assert len(long.prompt_ids) > POISONED + 10
    alone = asyncio.run(outcome(engine, short))
    restore = poison(engine, POISONED)
    assert isinstance(asyncio.run(outcome(engine, long)), GenerationFailed)  # NaN left in row 0
    restore()

    async def after():
        started = asyncio.Event()
        first = asyncio.create_task(collect(engine, short, lambda i, _: started.set()))
        await started.wait()  # row 0 again; the longer row joins beside it
        kept, other = await asyncio.gather(first, outcome(engine, long))
        return token_ids(kept), other

    short_after, long_after = asyncio.run(after())
    assert short_after == alone and isinstance(long_after, list)


def test_a_draw_that_fails_ends_that_row_only(engine):
    """A sampling failure past validation (here a temperature that overflows the logits,
    submitted straight to the scheduler) fails its request alone."""
    good = request(engine, PROMPT, rid="good", max_tokens=12, temperature=0.8, seed=3)
    alone = asyncio.run(outcome(engine, good))
    bad = request(engine, PROMPT, rid="bad", max_tokens=12)
    bad = type(bad)("bad", bad.prompt_ids, SamplingParams(max_tokens=12, temperature=1e-300))

    async def together():
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        text = TextStream(engine.tokenizer, bad.prompt_ids)
        seq = Sequence(bad, None, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), text)
        engine.scheduler.submit(seq)
        kept = await outcome(engine, good)
        return kept, await events.get()

    kept, first_event = asyncio.run(together())
    assert isinstance(first_event, GenerationFailed) and "sampling failed" in str(first_event)
    assert kept == alone


def test_prompt_scoring_with_non_finite_logits_fails_alone(engine):
    scored = request(engine, PROMPT * 3, rid="scored", max_tokens=0, echo=True, logprobs=1)
    restore = poison(engine, 20)
    result = asyncio.run(outcome(engine, scored))
    restore()
    assert isinstance(result, GenerationFailed)
    asyncio.run(engine.stop())  # the model thread cleans the row right after reporting
    assert torch.isfinite(torch.stack(engine.cache.k)).all()


def test_an_adapter_with_non_finite_values_is_refused_at_load(assets):
    """A NaN weight would reach every row of a mixed batch (the weak-column product runs all
    slots as one GEMM: 0 * NaN = NaN), so such an adapter never loads."""
    ckpt, adapters = assets
    bad = random_adapter(load_checkpoint(ckpt), "nan-adapter", seed=3)
    layer = next(iter(bad.columns))
    bad.columns[layer][0, 0] = float("nan")
    save_adapter(bad, adapters / "nan-adapter")
    engine = started_engine(ckpt, adapters)

    async def main():
        with pytest.raises(AdapterConflict, match="NaN") as first:
            await engine.adapters.load("nan-adapter")
        with pytest.raises(AdapterConflict, match="NaN"):
            await engine.adapters.resolve("nan-adapter")  # a request naming it: 409, not loaded
        await engine.stop()
        return str(first.value)

    assert layer in asyncio.run(main())
    assert [s.status for s in engine.adapters.states() if s.name == "nan-adapter"] == ["refused"]
