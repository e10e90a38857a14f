"""Continuous batching: a request's tokens do not depend on who else is in the batch."""

import asyncio

import pytest
from engine_fixtures import (
    RecordingObserver,
    build_tiny_server_assets,
    collect,
    request,
    started_engine,
    token_ids,
)

PROMPTS = [
    "It is a truth universally acknowledged",
    "Sir Walter Elliot, of Kellynch Hall",
    "must be in want of a wife",
    "the Baronetage",
    "their daughters. However little known the feelings or views of such a man may be on his",
    "a",
    "0123",
    "surrounding families",
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def assets(request, tmp_path_factory):
    return build_tiny_server_assets(tmp_path_factory.mktemp("assets"), request.param, 4)


async def load_all(engine, n=4):
    for i in range(n):
        await engine.adapters.load(f"adapter-{i}")


async def in_busy_batch(engine, targets, others, min_tokens=3):
    """Run `others` (staggered: each joins after the previous produced tokens), then `targets`
    while the others are still running; returns the targets' events."""
    tasks = []
    for req in others:
        started = asyncio.Event()
        tasks.append(asyncio.create_task(
            collect(engine, req, lambda i, _e, s=started: i >= min_tokens and s.set())
        ))  # fmt: skip
        await started.wait()
    results = await asyncio.gather(*(collect(engine, t) for t in targets))
    await asyncio.gather(*tasks)
    return results


def other_requests(engine, sampled=False):
    extra = {"temperature": 0.8, "seed": 5} if sampled else {}
    return [
        request(engine, PROMPTS[i], [None, "adapter-0", "adapter-2", "adapter-3"][i % 4],
                rid=f"o{i}", max_tokens=30 + 7 * i, **extra)
        for i in range(8)
    ]  # fmt: skip


def test_greedy_alone_equals_inside_running_batch(assets):
    observer = RecordingObserver()
    engine = started_engine(*assets, max_batch=10, num_slots=4, observer=observer)

    async def main():
        await load_all(engine)
        targets = [
            request(engine, "It is a truth, Sir", "adapter-1", rid="t1", max_tokens=24),
            request(engine, "Kellynch", None, rid="t2", max_tokens=17),
        ]
        alone = [await collect(engine, t) for t in targets]
        together = await in_busy_batch(engine, targets, other_requests(engine))
        await engine.stop()
        return alone, together

    alone, together = asyncio.run(main())
    for a, b, n in zip(alone, together, (24, 17), strict=True):
        assert token_ids(a) == token_ids(b)
        assert len(token_ids(a)) == n or a[-1].finish_reason == "stop"
    assert token_ids(alone[0]) != token_ids(alone[1])
    assert observer.max_running >= 8  # the targets really ran inside a full batch
    # every step was timed, labelled by the distinct adapters of its rows
    kinds = {(phase, adapters) for phase, adapters, _ in observer.phases}
    assert {("prefill", "1"), ("decode", "1"), ("decode", "0"), ("decode", "2+")} <= kinds
    assert {a for _, a, _ in observer.phases} == {"0", "1", "2+"}
    assert all(seconds > 0 for *_, seconds in observer.phases)


def test_seeded_sampling_same_alone_and_in_batch(assets):
    engine = started_engine(*assets, max_batch=10, num_slots=4)

    async def main():
        await load_all(engine)
        params = {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "max_tokens": 20}
        target = request(engine, "It is a truth", "adapter-2", rid="s", seed=1234, **params)
        alone = [await collect(engine, target) for _ in range(2)]
        (together,) = await in_busy_batch(engine, [target], other_requests(engine, True))
        other_seed = request(engine, "It is a truth", "adapter-2", seed=99, **params)
        different = await collect(engine, other_seed)
        await engine.stop()
        return alone, together, different

    alone, together, different = asyncio.run(main())
    assert token_ids(alone[0]) == token_ids(alone[1]) == token_ids(together)
    assert token_ids(different) != token_ids(alone[0])


def test_prompts_arriving_together_share_one_prefill(assets):
    """Short prompts that arrive together are prefilled in one padded forward (plus a scored
    one and a long one on their own); each still gets exactly its solo tokens."""
    engine = started_engine(*assets, max_batch=8, num_slots=4, prefill_chunk=64)

    async def main():
        await load_all(engine)
        reqs = [
            request(engine, PROMPTS[i], [None, "adapter-1", "adapter-3"][i % 3], rid=str(i),
                    max_tokens=6 + i)
            for i in range(6)
        ]  # fmt: skip
        reqs.append(request(engine, PROMPTS[4] * 2, "adapter-0", max_tokens=5))  # > one chunk
        reqs.append(request(engine, PROMPTS[1], max_tokens=3, echo=True, logprobs=2))
        alone = [await collect(engine, r) for r in reqs]
        steps_before = engine.scheduler.steps
        together = await asyncio.gather(*(collect(engine, r) for r in reqs))
        steps = engine.scheduler.steps - steps_before
        await engine.stop()
        return alone, together, steps

    alone, together, steps = asyncio.run(main())
    for a, b in zip(alone, together, strict=True):
        assert token_ids(a) == token_ids(b)
    assert together[-1][0].logprobs[1:] == pytest.approx(alone[-1][0].logprobs[1:], abs=1e-4)
    assert steps < sum(len(token_ids(a)) for a in alone)  # they really ran batched
