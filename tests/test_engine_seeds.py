"""What a seed guarantees, measured.

- Alone, a seeded request repeats its tokens exactly (one generator per request, drawn only for
  its own tokens).
- On the fp32 decode path (`--cpu-decode fp32`) a seeded request gives the same tokens in any
  batch, at any position, beside any adapters: per-row results differ only by fp32 summation
  order (~1e-5 of a logit), too little to move a draw here.
- The CPU 4-bit decode kernel itself is batch invariant: a row's output is bit for bit the same
  in a step of any number of rows (the kernel follows the step's kind, not its size).
- On the 4-bit decode path the weak-column part is one bag per row (`cpu_ops.weak_bag`), the
  same kernel whatever the other rows' slots, and on the real model a seeded request's tokens
  alone equal its tokens beside one and three other requests (tested below; it was a strict
  xfail while a base row beside others took another kernel: the default model diverged after
  13-30 tokens). Attention over the batch's longest cache can still differ in the last bits
  with the batch, and bf16 activations can turn that into a token, so this is measured here,
  not promised.
"""

import asyncio

import pytest
import torch
from engine_fixtures import (
    build_tiny_server_assets,
    collect,
    request,
    started_engine,
    tiny_quantized_model,
    token_ids,
)

from owq.kernels.cpu_ops import dense, plan

PROMPT = "It is a truth universally acknowledged"
OTHERS = ["Sir Walter Elliot", "must be in want of a wife", "0123", "the Baronetage", "a"]
ROWS = 24  # steps of 1..ROWS rows
SEEDED = {"temperature": 0.9, "top_p": 0.95, "seed": 7, "max_tokens": 40}


def test_each_fast_kernel_gives_a_row_the_same_bits_in_any_step(fast_kernel):
    model = tiny_quantized_model("llama", group_size=-1, bits=3)
    layer = model.model.layers[0].mlp.gate_proj
    cpu = plan(layer.packed, torch.float32, int4=True, resident=False)
    assert cpu.kernel == fast_kernel
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, 1, layer.in_features, generator=gen)
    alone = dense(x[:1], cpu, layer.packed, fast=True)[0]
    for rows in range(2, ROWS + 1):
        batch = x[:rows].clone()
        batch[rows - 1] = x[0]  # the same row, last in the step
        out = dense(batch, cpu, layer.packed, fast=True)
        assert torch.equal(out[0], alone) and torch.equal(out[rows - 1], alone), rows


@pytest.fixture(scope="module")
def fp32_assets(tmp_path_factory):
    return build_tiny_server_assets(tmp_path_factory.mktemp("seeds"), "llama", 3)


def others(engine, k: int) -> list:
    names = [None, "adapter-0", "adapter-1", "adapter-2"]
    return [
        request(engine, OTHERS[i % len(OTHERS)], names[i % 4], rid=f"o{i}",
                max_tokens=30 + 3 * i, temperature=0.8, seed=100 + i)
        for i in range(k)
    ]  # fmt: skip


@pytest.mark.parametrize("adapter", [None, "adapter-1"])
def test_seeded_tokens_are_the_same_in_any_batch_on_the_fp32_path(fp32_assets, adapter):
    engine = started_engine(*fp32_assets, max_batch=ROWS, num_slots=4, packed_decode=False)

    async def main():
        for i in range(3):
            await engine.adapters.load(f"adapter-{i}")
        target = request(engine, PROMPT, adapter, rid="seeded", **SEEDED)
        alone = [token_ids(await collect(engine, target)) for _ in range(2)]
        runs = {}
        for k, position in [(1, 0), (1, 1), (3, 2), (7, 0), (ROWS - 2, 9)]:
            reqs = others(engine, k)
            reqs.insert(position, target)
            results = await asyncio.gather(*(collect(engine, r) for r in reqs))
            runs[(k + 1, position)] = token_ids(results[position])
        await engine.stop()
        return alone, runs

    alone, runs = asyncio.run(main())
    assert alone[0] == alone[1] and len(alone[0]) > 10
    assert runs == dict.fromkeys(runs, alone[0])


@pytest.mark.slow
def test_seeded_tokens_on_the_packed_path_of_the_default_model(tmp_path):
    """On the real model's packed path a seeded request's tokens alone equal its tokens beside
    one and three other requests at other positions. The weak part is one bag per row
    (`cpu_ops.weak_bag`); before it, a base row beside others took another kernel and its
    tokens changed here (this test was a strict xfail)."""
    from owq.builtin.model import ModelMissing, load_float_model
    from owq.kernels import OWQLinear
    from owq.kernels.checkpoint import QuantConfig, save_checkpoint
    from owq.kernels.families import family_of, linear_weight, quantized_linear_paths, set_module

    try:
        model, tokenizer = load_float_model()
    except ModelMissing as e:
        pytest.skip(str(e))
    gen = torch.Generator().manual_seed(0)
    for path in quantized_linear_paths(model, family_of(model.config)):
        weight = linear_weight(model.get_submodule(path))
        idx = torch.randperm(weight.shape[1], generator=gen)[:8]
        set_module(model, path, OWQLinear.from_float(weight, 3, -1, idx))
    ckpt = save_checkpoint(model, tmp_path / "rtn3", QuantConfig(3, -1), tokenizer)
    engine = started_engine(ckpt, None, max_batch=4)

    async def main():
        target = request(engine, "Once upon a time, in a small village by the sea,", **SEEDED)
        alone = token_ids(await collect(engine, target))
        others = [
            request(engine, prompt, rid=f"o{i}", max_tokens=40, seed=i, temperature=0.9)
            for i, prompt in enumerate(["Dear Sir, I write to you", "The history of", "In the"])
        ]
        beside_one = await asyncio.gather(collect(engine, others[0]), collect(engine, target))
        beside_three = await asyncio.gather(
            *(collect(engine, r) for r in others), collect(engine, target)
        )
        await engine.stop()
        return alone, token_ids(beside_one[-1]), token_ids(beside_three[-1])

    alone, beside_one, beside_three = asyncio.run(main())
    assert len(alone) > 10 and beside_one == alone and beside_three == alone
