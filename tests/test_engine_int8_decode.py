"""The CPU int8 decode kernel (weight-only int8 codes, bf16 activations) against the fp32 path of
the same runtime, on one-group (per-channel) checkpoints of every family: prefill (more rows
than INT8_MAX_ROWS) is the fp32 path exactly, decode rows stay within bf16 rounding, rows on
different adapter slots in one int8 step equal each adapter merged into the base alone, and
grouped layers keep the fp32 path."""

import asyncio

import pytest
import torch
from engine_fixtures import (
    build_tiny_server_assets,
    install_slots,
    random_adapter,
    tiny_quantized_model,
)

from owq.server.engine import Engine
from owq.server.protocol import GenerationRequest, SamplingParams
from owq.server.runtime import KVCache, build_runtime, step_index
from owq.server.runtime.projection import INT8_MAX_ROWS, projections

KINDS = ["llama", "opt", "gpt2"]


def close_tol(ref: torch.Tensor) -> float:
    """bf16 activations: ~2^-8 relative per projection, compounded over the tiny model's blocks."""
    return 2e-2 * float(ref.abs().max())


def forward(rt, cache, tokens, start, slots=None, logits="all"):
    b, t = tokens.shape
    positions = torch.arange(start, start + t).expand(b, t).contiguous()
    with torch.inference_mode():
        return rt(tokens, step_index(cache.shape, 0, positions), cache, slots, logits)


def runtimes(model):
    exact, fast = build_runtime(model, 64), build_runtime(model, 64)
    exact.prepare(int8=False)
    fast.prepare(int8=True)
    return exact, fast


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_exact_decode_close(kind):
    model = tiny_quantized_model(kind, group_size=-1)
    exact, fast = runtimes(model)
    assert all(p.codes is not None for p in projections(fast))
    assert all(p.codes is None for p in projections(exact))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 128, (1, INT8_MAX_ROWS + 8), generator=gen)
    n = INT8_MAX_ROWS + 4
    caches = [KVCache(rt.cache_shape(1)) for rt in (exact, fast)]
    pre = [forward(rt, c, tokens[:, :n], 0) for rt, c in zip((exact, fast), caches, strict=True)]
    torch.testing.assert_close(pre[1], pre[0], rtol=0, atol=0)  # prefill: the fp32 path
    for t in range(n, tokens.shape[1]):
        e, f = (forward(rt, c, tokens[:, t : t + 1], t, logits="last")
                for rt, c in zip((exact, fast), caches, strict=True))  # fmt: skip
        assert 0 < float((f - e).abs().max()) <= close_tol(e)  # int8 ran, within bf16 rounding


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_slots_on_the_int8_path(kind):
    model = tiny_quantized_model(kind, group_size=-1)
    adapters = [random_adapter(model, f"a{i}", seed=i) for i in (1, 2)]
    refs = []  # same kernel, each adapter merged into the base's own columns
    for merged in install_slots(model, adapters):
        refs.append(build_runtime(merged, 64))
        refs[-1].prepare(int8=True)
    fast = refs[0]  # the base, its slot tables holding both adapters
    tokens = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(3))
    cache = KVCache(fast.cache_shape(3))
    slots = torch.tensor([0, 1, 2])
    forward(fast, cache, tokens[:, :5], 0, slots, "none")  # prefill: fp32
    out = forward(fast, cache, tokens[:, 5:], 5, slots, "last")  # one decode step: int8
    for row, ref_rt in enumerate(refs):
        ref_cache = KVCache(ref_rt.cache_shape(1))
        forward(ref_rt, ref_cache, tokens[row : row + 1, :5], 0, None, "none")
        ref = forward(ref_rt, ref_cache, tokens[row : row + 1, 5:], 5, None, "last")[0]
        torch.testing.assert_close(out[row], ref, rtol=0, atol=1e-4)
    assert not torch.allclose(out[1], out[0], atol=close_tol(out[0]))


def test_grouped_layers_keep_the_fp32_path():
    model = tiny_quantized_model("llama", group_size=32)
    _, fast = runtimes(model)
    assert all(p.codes is None for p in projections(fast))


def test_tokens_do_not_depend_on_the_batch(tmp_path):
    """A seeded request alone and beside three others on the served int8 path: the same tokens,
    logprobs equal to fp32 summation order (the kernel follows the step's shape, not its company:
    a rule by row count would score the grouped prefill in fp32 and the lone one in int8)."""
    ckpt, _ = build_tiny_server_assets(tmp_path, "llama", 0, group_size=-1)
    engine = Engine.from_checkpoint(ckpt, max_batch=4)
    params = SamplingParams(max_tokens=12, temperature=0.9, seed=5, logprobs=0)
    prompts = [(5, 9, 13, 2), (7, 7, 1), (3, 4, 5, 6, 8, 9, 10, 11), (21, 22)]

    async def tokens(prompt):
        req = GenerationRequest(f"r{prompt}", prompt, params)
        return [(ev.token_id, ev.logprob) async for ev in engine.generate(req)]

    async def main():
        engine.start()
        await asyncio.to_thread(engine.wait_ready, 60)
        try:
            alone = await tokens(prompts[0])
            together = await asyncio.gather(*(tokens(p) for p in prompts))
        finally:
            await engine.stop()
        return alone, together

    alone, together = asyncio.run(main())
    assert all(p.codes is not None for p in projections(engine.runtime))
    assert len(alone) == 12
    assert [t for t, _ in together[0]] == [t for t, _ in alone]
    assert max(abs(a - b) for (_, a), (_, b) in zip(alone, together[0], strict=True)) < 1e-4
