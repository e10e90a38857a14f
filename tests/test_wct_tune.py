"""Weak column tuning on a tiny OWQ checkpoint: what trains, what stays bit-identical, the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from owq.kernels.checkpoint import load_checkpoint
from owq.kernels.owq_linear import OWQLinear
from owq.quantizer.tuning.data import IGNORE, collate, encode_record, load_examples
from owq.quantizer.tuning.tune import (
    TuneConfig,
    batch_loss,
    evaluate,
    finish_weak_columns,
    prepare_weak_columns,
    select_layers,
    tune_weak_columns,
)
from tests.test_wct_support import make_checkpoint, single_thread, task_records, write_records
from tests.tiny_models import rtn_swap, tiny_model

__all__ = ["single_thread"]  # autouse fixture, imported to apply here


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("wct") / "base")


@pytest.fixture(scope="module")
def task(checkpoint, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    path = write_records(tmp_path_factory.mktemp("data") / "task.jsonl", task_records())
    return tokenizer, load_examples(path, tokenizer, max_len=64)


def _tune(checkpoint, examples, **overrides):
    model = load_checkpoint(checkpoint)
    cfg = TuneConfig(**({"epochs": 20, "lr": 1e-2, "batch_size": 3} | overrides))
    layers, result = tune_weak_columns(model, examples, cfg, examples, progress=False)
    return model, layers, result


def test_only_the_weak_columns_change(checkpoint, task):
    _, examples = task
    before = load_checkpoint(checkpoint).state_dict()
    model, layers, _ = _tune(checkpoint, examples, epochs=2)
    after = model.state_dict()
    tuned = {f"{path}.oweight" for path in layers}
    assert tuned and set(before) == set(after)
    for name, tensor in before.items():
        if name in tuned:
            assert after[name].dtype == torch.float16
            assert not torch.equal(after[name], tensor), name
        else:
            assert torch.equal(after[name], tensor), f"{name} changed"
    assert not any(p.requires_grad for p in model.parameters())


def test_loss_decreases_and_the_task_is_learned(checkpoint, task):
    _, examples = task
    base = evaluate(load_checkpoint(checkpoint), examples, 4, pad_id=0)
    _, _, result = _tune(checkpoint, examples)
    assert result.final_loss < 0.8 * result.first_loss
    assert result.evals[-1]["loss"] < base.loss
    assert result.evals[-1]["exact_match"] > base.exact_match
    assert result.peak_rss_bytes > 0 and result.input_tokens > 0


def test_completion_only_loss_masks_the_prompt(checkpoint, task):
    tokenizer, _ = task
    record = {"prompt": "Anne Elliot was nobody .", "completion": "persuasion"}
    example = encode_record(record, tokenizer)
    prompt_len = len(tokenizer(record["prompt"]).input_ids)
    assert all(label == IGNORE for label in example.labels[:prompt_len])
    assert example.labels[prompt_len:] == example.input_ids[prompt_len:]
    assert example.input_ids[-1] == tokenizer.eos_token_id
    model = load_checkpoint(checkpoint)
    batch = collate([example], pad_id=0)
    logits = model(batch.input_ids).logits[0, prompt_len - 1 : -1]
    expected = F.cross_entropy(logits, batch.input_ids[0, prompt_len:], reduction="sum")
    torch.testing.assert_close(batch_loss(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_text_records_train_on_every_token(task):
    tokenizer, _ = task
    example = encode_record({"text": "Captain Wentworth had no fortune ."}, tokenizer)
    assert example.labels == example.input_ids and example.target_tokens == 5


def test_attn_scope_touches_only_attention_layers(checkpoint, task):
    _, examples = task
    base = load_checkpoint(checkpoint)
    model, layers, _ = _tune(checkpoint, examples, epochs=2, layers="attn")
    assert layers == select_layers(base, "attn")
    assert all(".self_attn." in path for path in layers) and len(layers) == 2 * 4
    for name, module in model.named_modules():
        if isinstance(module, OWQLinear):
            same = torch.equal(module.oweight, base.get_submodule(name).oweight)
            assert same == (name not in layers), name


def test_mlp_scope_is_the_complement(checkpoint):
    model = load_checkpoint(checkpoint)
    attn, mlp = select_layers(model, "attn"), select_layers(model, "mlp")
    assert sorted(attn + mlp) == sorted(select_layers(model, "all"))
    assert all(".mlp." in path for path in mlp)


@pytest.mark.parametrize(
    "kind, attn, mlp, per_block",
    [("opt", "self_attn.", "fc", (4, 2)), ("gpt2", "attn.c_", "mlp.c_", (2, 2))],
)
def test_scopes_follow_the_family_table(kind, attn, mlp, per_block):
    model = rtn_swap(tiny_model(kind), bits=4, weak=4)
    counts = (len(select_layers(model, "attn")), len(select_layers(model, "mlp")))
    assert counts == (2 * per_block[0], 2 * per_block[1])
    assert all(f".{attn}" in p for p in select_layers(model, "attn"))
    assert all(f".{mlp}" in p for p in select_layers(model, "mlp"))


def test_masters_are_fp32_and_written_back_fp16(checkpoint):
    model = load_checkpoint(checkpoint)
    layers = select_layers(model)
    masters = prepare_weak_columns(model, layers)
    assert all(m.dtype == torch.float32 and m.requires_grad for m in masters.values())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(m) for m in masters.values()}
    finish_weak_columns(model, masters)
    assert all(model.get_submodule(p).oweight.dtype == torch.float16 for p in layers)


@pytest.mark.parametrize("bias", [False, True])
def test_training_forward_matches_the_layer(bias):
    torch.manual_seed(0)
    weight = torch.randn(24, 64)
    layer = OWQLinear.from_float(
        weight, 4, 32, torch.tensor([3, 40, 7]), torch.randn(24) if bias else None
    )
    layer.train_weak_columns()
    x = torch.randn(2, 5, 64, requires_grad=True)
    dense = layer.packed.dequantize().t()  # plain autograd through a float weight
    weak = x[..., layer.outlier_idx.long()] @ layer.trainable
    expected = x @ dense.t() + weak + (layer.bias.float() if bias else 0)
    grads = torch.autograd.grad(expected.square().sum(), (x, layer.trainable))
    got = layer(x)  # WCT mode: the frozen-dense function, nothing saved for the dense part
    got_grads = torch.autograd.grad(got.square().sum(), (x, layer.trainable))
    torch.testing.assert_close(got, expected)
    for a, b in zip(got_grads, grads, strict=True):
        torch.testing.assert_close(a, b)


def test_max_steps_beats_epochs(checkpoint, task):
    _, examples = task
    _, _, result = _tune(checkpoint, examples, epochs=1, max_steps=7)
    assert result.steps == 7 and result.epochs > 2


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="layers"):
        TuneConfig(layers="ffn")
    with pytest.raises(ValueError, match="batch_size"):
        TuneConfig(batch_size=0)
