"""The own runtime against transformers on the same OWQLinear layers: prefill, chunked prefill,
step-by-step decode, rows at different positions in one batch, per-row adapter slots."""

import copy
import dataclasses

import pytest
import torch
from engine_fixtures import (
    build_tiny_server_assets,
    merged_models,
    random_adapter,
    runtime_of,
    write_slot,
)

from owq.kernels.adapters import apply_adapter
from owq.kernels.checkpoint import load_checkpoint
from owq.server.runtime import KVCache, step_index

KINDS = ["llama", "opt", "gpt2"]
ATOL = 2e-4


@pytest.fixture(scope="module", params=KINDS)
def hf_model(request, tmp_path_factory):
    ckpt, _ = build_tiny_server_assets(tmp_path_factory.mktemp(request.param), request.param, 0)
    return load_checkpoint(ckpt)


def run(rt, cache, tokens, row0, start, slots=None, logits="all"):
    b, t = tokens.shape
    positions = (torch.arange(start, start + t)[None] + torch.zeros(b, 1, dtype=torch.long)).long()
    with torch.inference_mode():
        return rt(tokens, step_index(cache.shape, row0, positions), cache, slots, logits)


def reference(model, tokens):
    with torch.inference_mode():
        return model(tokens).logits


def test_prefill_matches_transformers(hf_model):
    rt = runtime_of(hf_model, 64)
    cache = KVCache(rt.cache_shape(4))
    tokens = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(run(rt, cache, tokens, 1, 0), reference(hf_model, tokens),
                               atol=ATOL, rtol=0)  # fmt: skip


def test_chunked_prefill_and_decode_match_transformers(hf_model):
    rt = runtime_of(hf_model, 64)
    cache = KVCache(rt.cache_shape(2))
    tokens = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    ref = reference(hf_model, tokens)[0]
    first = run(rt, cache, tokens[:, :5], 1, 0)[0]
    second = run(rt, cache, tokens[:, 5:12], 1, 5)[0]
    torch.testing.assert_close(torch.cat([first, second]), ref[:12], atol=ATOL, rtol=0)
    for t in range(12, 20):
        step = run(rt, cache, tokens[:, t : t + 1], 1, t, logits="last")[0]
        torch.testing.assert_close(step, ref[t], atol=ATOL, rtol=0)


def test_rows_at_different_positions_in_one_decode_step(hf_model):
    """Each row decodes at its own position over its own cache row, in one batched call."""
    rt = runtime_of(hf_model, 64)
    cache = KVCache(rt.cache_shape(3))
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 128, (1, n), generator=gen) for n in (3, 9, 6)]
    for row, p in enumerate(prompts):
        run(rt, cache, p[:, :-1], row, 0, logits="none")
    tokens = torch.stack([p[0, -1:] for p in prompts])  # [3, 1]
    positions = torch.tensor([[p.shape[1] - 1] for p in prompts])
    with torch.inference_mode():
        out = rt(tokens, step_index(cache.shape, 0, positions), cache, None, "last")
    for row, p in enumerate(prompts):
        torch.testing.assert_close(out[row], reference(hf_model, p)[0, -1], atol=ATOL, rtol=0)


def test_per_row_adapter_slots_match_merged_adapters(hf_model):
    """Rows with slots 0, 1, 2 equal the model with each adapter applied to its own columns."""
    adapters = [random_adapter(hf_model, f"a{i}", seed=i) for i in (1, 2)]
    models = merged_models(hf_model, adapters)
    rt = runtime_of(hf_model, 64, adapters)
    cache = KVCache(rt.cache_shape(3))
    tokens = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(3))
    out = run(rt, cache, tokens, 0, 0, slots=torch.tensor([0, 1, 2]))
    for row, model in enumerate(models):
        ref = reference(model, tokens[row : row + 1])[0]
        torch.testing.assert_close(out[row], ref, atol=ATOL, rtol=0)
    assert not torch.allclose(out[1], out[0], atol=1e-2)  # the adapters do change the outputs


def test_slot_rewritten_after_first_step_single_row(hf_model):
    """A slot rewritten after the runtime fused its weights (hot swap) reaches a lone row on that
    slot."""
    rt = runtime_of(hf_model, 64, [random_adapter(hf_model, "a0", seed=0)] * 3)
    cache = KVCache(rt.cache_shape(1))
    tokens = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    outs = []
    for seed in (7, 8):
        adapter = random_adapter(hf_model, f"a{seed}", seed=seed)
        write_slot(rt, 3, adapter)
        merged = copy.deepcopy(hf_model)
        apply_adapter(merged, adapter)
        outs.append(run(rt, cache, tokens, 0, 0, slots=torch.tensor([3])))
        torch.testing.assert_close(outs[-1], reference(merged, tokens), atol=ATOL, rtol=0)
    assert not torch.allclose(outs[0], outs[1], atol=1e-2)


def test_cache_rows_move(hf_model):
    """move_row carries a row's cache: decoding continues as if it had never moved."""
    rt = runtime_of(hf_model, 64)
    cache = KVCache(rt.cache_shape(3))
    tokens = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(4))
    run(rt, cache, tokens[:, :9], 2, 0, logits="none")
    cache.move_row(2, 0, 9)
    out = run(rt, cache, tokens[:, 9:], 0, 9, logits="last")[0]
    torch.testing.assert_close(out, reference(hf_model, tokens)[0, -1], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_default_model_runtime_matches_transformers():
    """SmolLM2-135M (30 layers, GQA 9/3, tied head) quantized with RTN + weak columns."""
    from owq.builtin.model import load_float_model
    from owq.kernels import OWQLinear
    from owq.kernels.families import family_of, linear_weight, quantized_linear_paths, set_module

    model, tokenizer = load_float_model()
    gen = torch.Generator().manual_seed(0)
    for path in quantized_linear_paths(model, family_of(model.config)):
        weight = linear_weight(model.get_submodule(path))
        idx = torch.randperm(weight.shape[1], generator=gen)[:8]
        set_module(model, path, OWQLinear.from_float(weight, 4, 64, idx))
    rt = runtime_of(model, 256)
    cache = KVCache(rt.cache_shape(2))
    ids = tokenizer("It is a truth universally acknowledged, that", return_tensors="pt").input_ids
    ref = reference(model, ids)[0]
    n = ids.shape[1]
    prefill = run(rt, cache, ids[:, : n - 3], 1, 0)[0]
    torch.testing.assert_close(prefill, ref[: n - 3], atol=2e-3, rtol=1e-4)
    for t in range(n - 3, n):
        step = run(rt, cache, ids[:, t : t + 1], 1, t, logits="last")[0]
        torch.testing.assert_close(step, ref[t], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("layout", ["heads", "flat", "chunk"])
def test_one_row_slice_write_equals_indexed_write(layout):
    """A step of one row at consecutive positions writes by slice; it must put every key and
    value where the general indexed write does, in the layouts the runtimes pass ([B, T, H, D],
    [B, T, H*D], and [B, T, H*D] views chunked out of a fused qkv), in a middle cache row,
    leaving the other rows untouched."""
    from owq.server.runtime.kv_cache import CacheShape

    shape = CacheShape(layers=2, rows=3, kv_heads=2, max_context=16, head_dim=4)
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, 5, 2, 4, generator=gen)
    v = torch.randn(1, 5, 2, 4, generator=gen)
    if layout == "flat":
        k, v = k.reshape(1, 5, 8), v.reshape(1, 5, 8)
    if layout == "chunk":
        q = torch.randn(1, 5, 8, generator=gen)
        _, k, v = torch.cat([q, k.reshape(1, 5, 8), v.reshape(1, 5, 8)], -1).chunk(3, dim=-1)
        assert not k.is_contiguous()
    positions = torch.arange(3, 8)[None]
    sliced = step_index(shape, 1, positions)
    assert sliced.start == 3
    indexed = dataclasses.replace(sliced, start=None)  # the same step, written by index
    caches = [KVCache(shape), KVCache(shape)]
    for cache, step in zip(caches, (sliced, indexed), strict=True):
        cache.write(1, k, v, step)
    for a, b in ((caches[0].k[1], caches[1].k[1]), (caches[0].v[1], caches[1].v[1])):
        assert torch.equal(a, b)
        assert a[1, :, 3:8].abs().sum() > 0 and a[0].abs().sum() == 0 and a[2].abs().sum() == 0
    assert step_index(shape, 1, torch.tensor([[3, 5]])).start is None  # not consecutive
    assert step_index(shape, 1, torch.arange(14, 17)[None]).start is None  # past the cache
    assert step_index(shape, 0, torch.arange(3, 5).expand(2, 2)).start is None  # two rows


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_cpu_cache_is_resident_only_where_written():
    """A server's CPU cache (16 rows x 2048 positions here: 192 MiB) costs resident memory for
    the positions written, not for rows x max_context; it reads as zeros until written."""
    from owq.server.runtime.kv_cache import CacheShape

    shape = CacheShape(layers=4, rows=16, kv_heads=3, max_context=2048, head_dim=64)
    nominal = 2 * 4 * 16 * 3 * 2048 * 64 * 4 / 2**20
    before = resident_mib()
    cache = KVCache(shape)
    assert resident_mib() - before < 0.05 * nominal
    for layer in range(shape.layers):  # one row's first 64 positions in every layer
        cache.k[layer][3, :, :64] = 1.0
        cache.v[layer][3, :, :64] = 2.0
    assert resident_mib() - before < 0.1 * nominal
    assert all(t.shape == (16, 3, 2048, 64) and t.is_contiguous() for t in cache.k + cache.v)
    assert (
        float(cache.k[2][3].sum()) == 3 * 64 * 64 and float(cache.v[1][3].sum()) == 2 * 3 * 64 * 64
    )
    assert (
        int(torch.count_nonzero(cache.k[0][:3])) == 0
        and int(torch.count_nonzero(cache.v[3][4:])) == 0
    )
    cache.k[0][5, :, :64] = 4.0
    cache.zero(3)  # a poisoned row: its pages are given back, the other rows keep theirs
    assert int(torch.count_nonzero(cache.k[2][3])) == 0
    assert float(cache.k[0][5].sum()) == 4 * 3 * 64 * 64
    cache.k[1][0, :, :64] = 5.0  # where a row past the end of layer 0 would fall
    with pytest.raises(IndexError):
        cache.zero(16)  # refused before any page is given back
    assert float(cache.k[1][0].sum()) == 5 * 3 * 64 * 64
    cache.zero()  # a failed step: the whole cache reads zero, and is not made resident
    assert all(int(torch.count_nonzero(t)) == 0 for t in cache.k + cache.v)
    assert resident_mib() - before < 0.1 * nominal


@pytest.mark.parametrize("rows,context", [(3, 5), (4, 100), (2, 700)])
def test_cpu_cache_zeroes_rows_of_any_size(rows, context):
    """Rows under a page, and rows whose ends fall inside pages, zero exactly (the whole pages
    given back, the partial ones written), and no other row changes."""
    from owq.server.runtime.kv_cache import CacheShape

    shape = CacheShape(layers=3, rows=rows, kv_heads=2, max_context=context, head_dim=8)
    cache = KVCache(shape)
    gen = torch.Generator().manual_seed(rows + context)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=gen))
    kept = [t.clone() for t in cache.k + cache.v]
    cache.zero(1)
    others = [r for r in range(rows) if r != 1]
    for t, old in zip(cache.k + cache.v, kept, strict=True):
        assert int(torch.count_nonzero(t[1])) == 0
        assert torch.equal(t[others], old[others])


def test_a_cache_that_can_outgrow_memory_is_named_at_start(monkeypatch, caplog):
    """A lazily committed cache lets a server start that cannot hold every row at full
    context; the engine says so at start-up, with the size and the flag that shrinks it."""
    from owq.server import engine
    from owq.server.runtime.kv_cache import CacheShape

    cache = KVCache(CacheShape(layers=2, rows=4, kv_heads=2, max_context=256, head_dim=8))
    assert cache.lazy and cache.nbytes == 2 * 2 * 4 * 2 * 256 * 8 * 4
    monkeypatch.setattr(engine, "available_bytes", lambda: cache.nbytes + 1)
    with caplog.at_level("WARNING", logger="owq.server.engine"):
        engine.warn_if_cache_outgrows_memory(cache)
    assert not caplog.records
    monkeypatch.setattr(engine, "available_bytes", lambda: cache.nbytes // 2)
    with caplog.at_level("WARNING", logger="owq.server.engine"):
        engine.warn_if_cache_outgrows_memory(cache)
    (record,) = caplog.records
    assert "4 rows x 256 positions" in record.getMessage()
    assert "--max-batch" in record.getMessage()
