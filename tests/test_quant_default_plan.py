"""The built-in default and its committed weak-column plan: the shipped adapters always fit.

The fast test compares the shipped adapters with the committed plan. The slow tests make the
default through `owq.default_checkpoint.default_checkpoint()` into a fresh temporary cache (so an
old default in a user's cache cannot hide a drift), with reduced calibration like
`test_quant_default_model.py`: the fingerprint depends only on the plan, the calibration size
changes only the stored values. Every shipped adapter must load on it and change its greedy
output on a fixed prompt.
"""

from __future__ import annotations

import pytest
import torch

import owq.default_checkpoint as dc
from owq.cli import main
from owq.kernels.adapters import apply_adapter, load_adapter
from owq.kernels.checkpoint import base_fingerprint, load_checkpoint
from owq.kernels.plan import plan_of_checkpoint

CALIBRATION = {"nsamples": 16, "seqlen": 256}
PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good"


def shipped_adapters() -> list:
    directory = dc.default_adapters_dir()
    assert directory is not None, "examples/adapters/ is part of the source tree"
    return sorted(p for p in directory.iterdir() if p.is_dir())


def test_shipped_adapters_fit_the_committed_plan():
    plan = dc.default_plan()
    layers = plan.by_name()
    # the whole-file global allocation at 3.45 bits with no rows to buy: uneven k (none in some
    # layers); the vocabulary table all 4-bit (rows lost to weak columns, BENCHMARKS.md)
    assert len(plan.layers) == 30 * 7 and sum(layer.k for layer in plan.layers) == 1878
    assert min(layer.k for layer in plan.layers) == 0 < max(layer.k for layer in plan.layers)
    assert plan.tables == ()
    assert len(shipped_adapters()) >= 2
    for path in shipped_adapters():
        adapter = load_adapter(path)
        assert adapter.base_fingerprint == plan.fingerprint, path.name
        for name, columns in adapter.columns.items():
            assert tuple(columns.shape) == (layers[name].k, layers[name].out_features), name


@pytest.fixture(scope="module")
def default_ckpt(tmp_path_factory):
    from owq.builtin.model import ModelMissing, default_gguf_path

    try:
        default_gguf_path()
    except ModelMissing as e:
        pytest.skip(str(e))
    cache = tmp_path_factory.mktemp("owq-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OWQ_CACHE", str(cache))
        mp.setattr(dc, "DEFAULT_SETTINGS", dc.DEFAULT_SETTINGS | CALIBRATION)
        path = dc.default_checkpoint()
    assert path == cache / dc.CHECKPOINT_NAME
    return path


def _greedy(model, tokenizer) -> list[int]:
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    return out[0, ids.input_ids.shape[1] :].tolist()


@pytest.mark.slow
def test_the_default_has_the_committed_plan(default_ckpt):
    plan = dc.default_plan()
    assert plan_of_checkpoint(default_ckpt) == plan
    assert base_fingerprint(load_checkpoint(default_ckpt)) == plan.fingerprint


@pytest.mark.slow
def test_every_shipped_adapter_loads_and_changes_greedy_output(default_ckpt):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_ckpt)
    model = load_checkpoint(default_ckpt)
    base = _greedy(model, tokenizer)
    for path in shipped_adapters():
        model = load_checkpoint(default_ckpt)
        apply_adapter(model, load_adapter(path))  # checks the fingerprint and every shape
        tuned = _greedy(model, tokenizer)
        assert tuned != base, f"{path.name}: {tokenizer.decode(tuned)!r}"


@pytest.mark.slow
def test_doctor_passes_with_the_default(default_ckpt, monkeypatch, capsys):
    monkeypatch.setenv("OWQ_CACHE", str(default_ckpt.parent))
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"fits in the cache: {dc.CHECKPOINT_NAME}" in out
    assert f"{dc.CHECKPOINT_NAME}: 16 tokens in" in out
