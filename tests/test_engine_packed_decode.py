"""The CPU 4-bit packed decode kernel (codes repacked for `_weight_int4pack_mm_for_cpu`, bf16
activations) against the fp32 path of the same runtime, on one-group (per-channel) checkpoints of
every family: prefill is the fp32 path exactly, decode rows stay within bf16 rounding, rows on
different adapter slots in one packed step equal each adapter merged into the base alone, and
grouped layers keep the fp32 path."""

import asyncio

import pytest
import torch
from engine_fixtures import (
    build_tiny_server_assets,
    merged_models,
    random_adapter,
    runtime_of,
    tiny_quantized_model,
)

from owq.kernels import OWQLinear
from owq.kernels.cpu_ops import fast_twin
from owq.kernels.fused import fuse
from owq.server.engine import Engine, EngineConfig
from owq.server.protocol import GenerationRequest, SamplingParams
from owq.server.runtime import KVCache, step_index

KINDS = ["llama", "opt", "gpt2"]
ROWS = 16  # the server's default running batch


def projections(runtime) -> list[OWQLinear]:
    return [m for m in runtime.modules() if isinstance(m, OWQLinear)]


def packed(layer: OWQLinear) -> bool:
    return layer.cpu is not None and layer.cpu.kernel is not None


def close_tol(ref: torch.Tensor) -> float:
    """bf16 activations: ~2^-9 relative per projection, compounded over the tiny random model's
    blocks (their gains are large: INIT_STD 0.3); the exact emulation is tested per projection."""
    return 5e-2 * float(ref.abs().max())


@pytest.mark.parametrize("rows", [1, 3, ROWS, 40])
@pytest.mark.parametrize("group_size,bits", [(-1, 3), (-1, 2), (32, 3), (-1, 4), (32, 4)])
def test_projection_equals_its_kernels_emulation(rows, group_size, bits, fast_kernel):
    """Each fast kernel computes exactly its twin (torch's 4-bit kernel: bf16(x) @ ((q - z)·
    bf16(scale)), accumulated in fp32 and rounded to bf16, 4-bit codes' zero term added in fp32
    after; the 16-bit GEMM: int16 rows, exact integer sums), plus the fp32 weak part and bias;
    for per-channel and grouped layers of 2, 3 and 4 bits, two layers fused in one."""
    model = tiny_quantized_model("opt", group_size=group_size, bits=bits)
    layers = [
        model.model.decoder.layers[0].self_attn.q_proj,
        model.model.decoder.layers[0].self_attn.v_proj,
    ]
    proj = fuse(layers)
    proj.prepare(torch.float32, int4=True)
    assert proj.cpu.kernel == fast_kernel
    x = torch.randn(rows, 1, layers[0].in_features, generator=torch.Generator().manual_seed(1))
    parts = []
    for layer in layers:
        dense = fast_twin(x[:, 0], proj.cpu, layer.packed)[:, None]
        weak = x[..., layer.outlier_idx.long()] @ layer.oweight.float()
        parts.append(dense + weak + layer.bias.float())
    torch.testing.assert_close(proj(x, fast=True), torch.cat(parts, -1), rtol=2**-8, atol=1e-5)
    exact = torch.cat([layer(x) for layer in layers], -1)
    torch.testing.assert_close(proj(x), exact, rtol=0, atol=1e-5)  # not a decode step: fp32


def forward(rt, cache, tokens, start, slots=None, logits="all", decode=False):
    b, t = tokens.shape
    positions = torch.arange(start, start + t).expand(b, t).contiguous()
    with torch.inference_mode():
        return rt(tokens, step_index(cache.shape, 0, positions, decode), cache, slots, logits)


def runtimes(model):
    exact, fast = runtime_of(model, 64), runtime_of(model, 64)
    exact.prepare(packed=False)
    fast.prepare(packed=True)
    return exact, fast


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_exact_decode_close(kind):
    model = tiny_quantized_model(kind, group_size=-1, bits=3)
    exact, fast = runtimes(model)
    assert all(packed(p) for p in projections(fast))
    assert all(not packed(p) for p in projections(exact))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 128, (1, ROWS + 8), generator=gen)
    n = ROWS + 4
    caches = [KVCache(rt.cache_shape(1)) for rt in (exact, fast)]
    pre = [forward(rt, c, tokens[:, :n], 0) for rt, c in zip((exact, fast), caches, strict=True)]
    torch.testing.assert_close(pre[1], pre[0], rtol=0, atol=0)  # prefill: the fp32 path
    lone = [forward(rt, KVCache(rt.cache_shape(1)), tokens[:, :1], 0) for rt in (exact, fast)]
    torch.testing.assert_close(lone[1], lone[0], rtol=0, atol=0)  # a one-token prompt too
    for t in range(n, tokens.shape[1]):
        e, f = (forward(rt, c, tokens[:, t : t + 1], t, logits="last", decode=True)
                for rt, c in zip((exact, fast), caches, strict=True))  # fmt: skip
        assert 0 < float((f - e).abs().max()) <= close_tol(e)  # packed ran, within bf16 rounding


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_slots_on_the_packed_path(kind):
    model = tiny_quantized_model(kind, group_size=-1, bits=3)
    adapters = [random_adapter(model, f"a{i}", seed=i) for i in (1, 2)]
    refs = []  # each adapter merged into the base's own columns (the fp32 GEMM)
    for merged in merged_models(model, adapters):
        refs.append(runtime_of(merged, 64))
        refs[-1].prepare(packed=True)
    fast = runtime_of(model, 64, adapters)  # the base, its slot tables holding both adapters
    fast.prepare(packed=True)
    tokens = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(3))
    cache = KVCache(fast.cache_shape(3))
    slots = torch.tensor([0, 1, 2])
    forward(fast, cache, tokens[:, :5], 0, slots, "none")  # prefill: fp32
    out = forward(fast, cache, tokens[:, 5:], 5, slots, "last", decode=True)  # packed
    for row, ref_rt in enumerate(refs):  # each row alone on its slot: the same numbers
        cache_row = KVCache(fast.cache_shape(1))
        forward(fast, cache_row, tokens[row : row + 1, :5], 0, slots[row : row + 1], "none")
        alone = forward(fast, cache_row, tokens[row : row + 1, 5:], 5, slots[row : row + 1],
                        "last", True)[0]  # fmt: skip
        # attention differs in fp32's last bits beside other rows; on the 16-bit GEMM such a bit
        # may move an input to the next int16 step (1/32767 of its row's largest): 2.4e-5 here
        tight = 1e-4 * float(alone.abs().max())
        torch.testing.assert_close(out[row], alone, rtol=0, atol=tight)
        ref_cache = KVCache(ref_rt.cache_shape(1))  # the adapter merged: within fp16 rounding
        forward(ref_rt, ref_cache, tokens[row : row + 1, :5], 0, None, "none")
        ref = forward(ref_rt, ref_cache, tokens[row : row + 1, 5:], 5, None, "last", True)[0]
        torch.testing.assert_close(
            out[row], ref, rtol=0, atol=tight if row == 0 else close_tol(ref)
        )
    assert not torch.allclose(out[1], out[0], atol=close_tol(out[0]))


@pytest.mark.parametrize("group_size,bits", [(32, 3), (-1, 4), (32, 4)])
def test_grouped_and_4bit_layers_take_the_packed_path_too(group_size, bits):
    """No fp32 copy stays resident: every layer decodes from its 4-bit form, and prefill, from a
    transient dequantized copy, equals the resident fp32 path bit for bit."""
    model = tiny_quantized_model("llama", group_size=group_size, bits=bits)
    exact, fast = runtimes(model)
    assert all(packed(p) and p.cpu.weight is None for p in projections(fast))
    tokens = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    caches = [KVCache(rt.cache_shape(1)) for rt in (exact, fast)]
    pre = [forward(rt, c, tokens[:, :8], 0) for rt, c in zip((exact, fast), caches, strict=True)]
    torch.testing.assert_close(pre[1], pre[0], rtol=0, atol=0)
    e, f = (forward(rt, c, tokens[:, 8:], 8, logits="last", decode=True)
            for rt, c in zip((exact, fast), caches, strict=True))  # fmt: skip
    assert 0 < float((f - e).abs().max()) <= close_tol(e)


def test_tokens_do_not_depend_on_the_batch(tmp_path):
    """A seeded request alone and beside three others on the served packed path: the same tokens,
    logprobs equal to fp32 summation order (the kernel follows the step's shape, not its company:
    a rule by step shape would run the lone one-token prompt packed, the padded group fp32)."""
    ckpt, _ = build_tiny_server_assets(tmp_path, "llama", 0, group_size=-1, bits=3)
    engine = Engine.from_checkpoint(ckpt, EngineConfig(max_batch=4))
    params = SamplingParams(max_tokens=12, temperature=0.9, seed=5, logprobs=0)
    prompts = [(5,), (7, 7, 1), (3, 4, 5, 6, 8, 9, 10, 11), (21, 22)]  # a one-token prompt

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
    assert all(packed(p) for p in projections(engine.runtime))
    assert len(alone) == 12
    assert [t for t, _ in together[0]] == [t for t, _ in alone]
    assert max(abs(a - b) for (_, a), (_, b) in zip(alone, together[0], strict=True)) < 1e-4
