"""Quantized vocabulary tables: the head's logits and the embedding's rows against a float table
built from the same codes, protected rows exact, tied tables stored once, untied ones both
quantized, save -> load -> the same logits, the runtime on the packed head."""

import pytest
import torch
from engine_fixtures import runtime_of
from tiny_models import VOCAB, tiny_model

from owq.kernels.checkpoint import QuantConfig, load_checkpoint, read_checkpoint, save_checkpoint
from owq.kernels.owq_vocab import OWQEmbedding, OWQVocab, TiedEmbedding
from owq.quantizer.api import quantize
from owq.server.runtime import KVCache, step_index

D, V = 64, 160


def table(bits=4, group_size=-1, weak=(3, 17), protected=(5, 100, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(V, D, generator=gen)
    layer = OWQVocab.from_float_rows(
        W, bits, group_size, torch.tensor(weak, dtype=torch.long),
        torch.tensor(protected, dtype=torch.long),
    )  # fmt: skip
    return layer, W


def reference_table(layer: OWQVocab) -> torch.Tensor:
    """The float table [V, D] the stored parts stand for, built independently of `lookup`."""
    dense = layer.packed.dequantize(torch.float32).t().clone()  # [V, D]
    dense[:, layer.outlier_idx.long()] = layer.oweight.float().t()
    dense[layer.protected_idx.long()] = layer.protected_weight.float()
    return dense


@pytest.mark.parametrize("bits,group_size", [(4, -1), (3, 32), (4, 32), (8, -1), (2, 64)])
@pytest.mark.parametrize("protected", [(), (5, 100, 7)])
def test_logits_and_lookups_equal_the_float_table(bits, group_size, protected):
    layer, W = table(bits, group_size, protected=protected)
    ref = reference_table(layer)
    x = torch.randn(3, 2, D)
    torch.testing.assert_close(layer(x), x @ ref.t(), rtol=1e-5, atol=1e-4)
    ids = torch.tensor([[5, 9, 5], [100, 3, 0]])
    torch.testing.assert_close(layer.lookup(ids), ref[ids], rtol=0, atol=0)
    pidx = list(protected)
    rows = layer.lookup(torch.tensor(pidx, dtype=torch.long))
    assert torch.equal(rows.half(), W[pidx].half())  # exact fp16
    if protected:  # their codes dequantize to 0 and their weak columns are 0
        dense = layer.packed.dequantize(torch.float32)[:, pidx]
        assert bool((dense == 0).all()) and bool((layer.oweight[:, pidx] == 0).all())


def test_decode_on_the_4bit_kernel_stays_close_to_the_table():
    layer, _ = table(4, 32)
    x = torch.randn(5, 1, D)
    exact = x @ reference_table(layer).t()
    layer.prepare(torch.float32, int4=True, resident=False)
    assert layer.cpu.kernel is not None and layer.cpu.weight is None  # low-bit bytes only
    fast = layer(x, None, fast=True)
    assert 0 < float((fast - exact).abs().max()) <= 2e-2 * float(exact.abs().max())
    torch.testing.assert_close(layer(x), fast, rtol=0, atol=0)  # the head: prefill too
    layer.prepare(torch.float32, int4=False)
    torch.testing.assert_close(layer(x), exact, rtol=1e-5, atol=1e-4)  # offline: the fp32 table


def _quantized(kind, tmp_path, **head):
    model = tiny_model(kind)
    ids = torch.randint(0, VOCAB, (3000,), generator=torch.Generator().manual_seed(1))
    return quantize(
        model, tmp_path / kind, calibration_ids=ids, nsamples=6, seqlen=48, wbits=4,
        weak_columns=2, progress=False, **head,
    )  # fmt: skip


HEAD = {"head_bits": 4, "head_groupsize": 32, "head_protect": 0.05, "head_weak_columns": 2}


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2", "mistral"])
def test_quantized_head_saves_loads_and_serves(kind, tmp_path):
    ckpt = _quantized(kind, tmp_path, **HEAD)
    stored = read_checkpoint(ckpt)
    assert stored.quant["format_version"] == 2 and stored.quant["head_bits"] == 4
    assert "lm_head.qweight" in stored.tensors and "lm_head.weight" not in stored.tensors
    model = load_checkpoint(ckpt)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, OWQVocab) and head.num_protected == round(0.05 * VOCAB)
    tied = kind != "mistral"
    assert isinstance(embed, TiedEmbedding if tied else OWQEmbedding)
    embed_keys = [k for k in stored.tensors if ".embed_tokens." in k or ".wte." in k]
    assert bool(embed_keys) != tied  # a tied table is stored once, under the head
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    again = save_checkpoint(model, tmp_path / "again", QuantConfig(4, -1))
    with torch.inference_mode():
        ref = model(tokens).logits
        torch.testing.assert_close(load_checkpoint(again)(tokens).logits, ref, rtol=0, atol=0)
    rt = runtime_of(model, 64)
    cache = KVCache(rt.cache_shape(2))
    positions = torch.arange(9).expand(2, 9).contiguous()
    with torch.inference_mode():
        got = rt(tokens, step_index(cache.shape, 0, positions), cache, None, "all")
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-4)


def test_packed_head_decode_matches_the_fp32_path(tmp_path):
    model = load_checkpoint(_quantized("llama", tmp_path, **HEAD))
    exact, fast = runtime_of(model, 64), runtime_of(model, 64)
    exact.prepare(packed=False)
    fast.prepare(packed=True)
    assert fast.vocab.head.cpu.kernel is not None and fast.vocab.head.cpu.weight is None
    tokens = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    out = []
    for rt in (exact, fast):
        cache = KVCache(rt.cache_shape(1))
        with torch.inference_mode():
            rt(tokens[:, :6], step_index(cache.shape, 0, torch.arange(6)[None]), cache)
            step = step_index(cache.shape, 0, torch.tensor([[6]]), decode=True)
            out.append(rt(tokens[:, 6:], step, cache, None, "last"))
    assert 0 < float((out[1] - out[0]).abs().max()) <= 5e-2 * float(out[0].abs().max())


def test_head_bits_16_writes_the_format_of_before(tmp_path):
    ckpt = _quantized("llama", tmp_path)
    stored = read_checkpoint(ckpt)
    assert stored.quant["format_version"] == 1 and "head_bits" not in stored.quant
    assert "lm_head.qweight" not in stored.tensors and "model.embed_tokens.weight" in stored.tensors


def test_head_options_without_head_bits_are_refused(tmp_path):
    with pytest.raises(ValueError, match="need --head-bits"):
        _quantized("llama", tmp_path, head_protect=0.01)


def test_head_bits_16_checkpoint_bytes_did_not_change(tmp_path):
    """The exact bytes a head-bits-16 checkpoint had before vocabulary quantization existed
    (min-max RTN: elementwise, so the same on every machine)."""
    import hashlib

    out = quantize(
        tiny_model("llama"), tmp_path / "q", method="rtn", wbits=3, search=False, progress=False
    )
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert digest == "04e21226dbd2e32c950a2f40eb3b58a04726aa9d8f71bb63e94e22ad7e9f4aca"


@pytest.mark.parametrize("rows", [[100, 5, 7], [5, 5, 7], [5, 7, V]], ids=str)
def test_a_table_with_unsorted_or_outside_protected_rows_is_refused_at_load(rows):
    good = table()[0].state_dict()
    bad = {**good, "protected_idx": torch.tensor(rows, dtype=good["protected_idx"].dtype)}
    fresh, _ = table()
    with pytest.raises(RuntimeError, match="protected rows"):
        fresh.load_state_dict(bad)
    fresh.load_state_dict(good)  # the same table with its own rows loads
