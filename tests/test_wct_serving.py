"""A served adapter behaves as trained: greedy tokens through adapter slots == the tuned model's.

Serving keeps one base and writes each adapter's weak columns into an `OWQLinear` slot; a batch
row picks its slot (`forward(x, slots)`). Here the slots are driven through the transformers model
with forward pre-hooks (what the server's runtime does natively): row 0 runs the base (slot 0),
row 1 the adapter (slot 1), in one mixed batch, and each must match its model run offline. The
last test does the same through the server's `Engine` (own runtime, scheduler, adapter registry).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoTokenizer

from owq.kernels.adapters import Adapter, load_adapter, save_adapter
from owq.kernels.checkpoint import load_checkpoint
from owq.kernels.owq_linear import OWQLinear
from owq.quantizer.adapters import apply_adapter
from owq.quantizer.tuning.data import load_examples
from owq.quantizer.tuning.tune import TuneConfig, make_adapter, tune_weak_columns
from owq.server.engine import Engine, EngineConfig
from owq.server.protocol import GenerationRequest, SamplingParams, TokenOutput
from tests.test_wct_support import make_checkpoint, single_thread, task_records, write_records

__all__ = ["single_thread"]

PROMPTS = ["Anne Elliot was nobody with either father or sister . Which novel ?", "Harriet Smith"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "base")


def _tuned_adapter(checkpoint, tmp_path, scope: str) -> Adapter:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    examples = load_examples(write_records(tmp_path / "t.jsonl", task_records()), tokenizer, 64)
    model = load_checkpoint(checkpoint)
    cfg = TuneConfig(epochs=10, lr=2e-2, batch_size=3, layers=scope)
    layers, result = tune_weak_columns(model, examples, cfg, progress=False)
    save_adapter(make_adapter(model, layers, "novels", cfg, result), tmp_path / "novels")
    return load_adapter(tmp_path / "novels")


def _load_into_slot(model, adapter: Adapter, slot: int) -> None:
    """What a server does: every layer's slot gets the adapter's columns, or the base's own."""
    for name, layer in model.named_modules():
        if isinstance(layer, OWQLinear):
            layer.resize_slots(slot)
            layer.set_slot(slot, adapter.columns.get(name, layer.oweight.detach()))


def _route_slots(model, slots: torch.Tensor) -> list:
    def inject(_module, args, kwargs):
        return args, {**kwargs, "slots": slots}

    return [
        m.register_forward_pre_hook(inject, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, OWQLinear)
    ]


@torch.no_grad()
def _greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """ids: [B, T] -> [B, steps] greedy tokens (full recompute, no cache)."""
    out = []
    for _ in range(steps):
        token = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
        ids = torch.cat([ids, token], 1)
    return torch.cat(out, 1)


@pytest.mark.parametrize("scope", ["all", "attn"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_mixed_batch_slots_match_the_offline_models(checkpoint, tmp_path, scope, prompt):
    adapter = _tuned_adapter(checkpoint, tmp_path, scope)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = torch.tensor([tokenizer(prompt).input_ids])
    base = load_checkpoint(checkpoint)
    tuned = load_checkpoint(checkpoint)
    apply_adapter(tuned, adapter)
    expect_base, expect_tuned = _greedy(base, ids, 8), _greedy(tuned, ids, 8)
    assert not torch.equal(expect_base, expect_tuned), "the adapter should change the output"

    served = load_checkpoint(checkpoint)
    _load_into_slot(served, adapter, slot=1)
    hooks = _route_slots(served, torch.tensor([0, 1]))
    try:
        got = _greedy(served, ids.repeat(2, 1), 8)
        logits = served(ids.repeat(2, 1)).logits
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(got[0], expect_base[0]) and torch.equal(got[1], expect_tuned[0])
    with torch.no_grad():
        torch.testing.assert_close(logits[1], tuned(ids).logits[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[0], base(ids).logits[0], rtol=1e-4, atol=1e-4)


async def _engine_tokens(engine: Engine, ids: list[int], adapters: list[str | None]) -> list:
    async def one(index: int, adapter: str | None) -> list[int]:
        params = SamplingParams(max_tokens=8, temperature=0.0)
        handle = await engine.adapters.resolve(engine.adapters.adapter_name(adapter))
        stream = engine.generate(GenerationRequest(f"r{index}", tuple(ids), params, handle))
        return [e.token_id async for e in stream if isinstance(e, TokenOutput)]

    await engine.adapters.load("novels")
    try:
        return await asyncio.gather(*(one(i, a) for i, a in enumerate(adapters)))
    finally:
        await engine.stop()


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@pytest.mark.parametrize("scope", ["all", "attn"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_engine_serves_the_adapter_as_trained(checkpoint, tmp_path, scope, prompt):
    _tuned_adapter(checkpoint, tmp_path, scope)  # writes tmp_path / "novels"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer(prompt).input_ids
    base, tuned = load_checkpoint(checkpoint), load_checkpoint(checkpoint)
    apply_adapter(tuned, tmp_path / "novels")
    eos = tokenizer.eos_token_id
    expect = [
        _until_eos(_greedy(m, torch.tensor([ids]), 8)[0].tolist(), eos) for m in (base, tuned)
    ]
    assert expect[0] != expect[1], "the adapter should change the output"
    engine = Engine.from_checkpoint(checkpoint, EngineConfig(max_batch=2), adapters_dir=tmp_path)
    engine.start()
    assert engine.wait_ready(60)
    got = asyncio.run(_engine_tokens(engine, ids, [None, "novels"]))
    assert [_until_eos(g, eos) for g in got] == expect
