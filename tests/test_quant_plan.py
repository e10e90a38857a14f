"""Weak-column plans: export, re-quantize with `--weak-columns-from`, one fingerprint everywhere.

A base re-quantized from another's plan (other calibration text, another group size) keeps its
weak-column indices and so its fingerprint, whichever way it is computed (loaded model, checkpoint
tensors, plan file); a plan that does not fit the model, or options it replaces, are refused in
one line and write nothing.
"""

from __future__ import annotations

import json

import pytest
import torch
from quant_helpers import char_tokenizer, synthetic_text, tiny_model_dir
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

from owq.cli import main
from owq.kernels.checkpoint import base_fingerprint, load_checkpoint
from owq.kernels.plan import PlanError, plan_of_checkpoint, plan_of_model, read_plan_file
from owq.quantizer.layer import gptq_linear
from owq.quantizer.settings import QuantizeSettings


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir("llama", tmp_path_factory.mktemp("models"))


def _calib(path, seed: int):
    path.write_text(synthetic_text(6000, seed=seed))
    return str(path)


def _quantize(model_dir, out, calib, *extra) -> list[str]:
    argv = ["quantize", str(model_dir), str(out), "--calib", calib, "--nsamples", "4"]
    return argv + ["--seqlen", "64", "--quiet", *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory, model_dir):
    """A tiny OWQ base with k = 3 weak columns per layer."""
    root = tmp_path_factory.mktemp("base")
    out = root / "base"
    calib = _calib(root / "calib.txt", 0)
    assert main(_quantize(model_dir, out, calib, "--weak-columns", "3")) == 0
    return out


def _fail(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("owq: error: "), err
    return err[0]


def test_plan_export_is_small_and_has_the_checkpoints_indices(base, tmp_path, capsys):
    plan_file = tmp_path / "base.plan.json"
    assert main(["plan", "export", str(base), str(plan_file)]) == 0
    printed = capsys.readouterr().out
    plan = read_plan_file(plan_file)
    model = load_checkpoint(base)
    assert plan == plan_of_model(model) == plan_of_checkpoint(base)
    assert plan.fingerprint == base_fingerprint(model) and plan.fingerprint in printed
    assert len(plan.layers) == 14 and all(layer.k == 3 for layer in plan.layers)
    assert plan_file.stat().st_size < 4096
    assert "exists" in _fail(capsys, ["plan", "export", str(base), str(plan_file)])


def test_requantizing_with_the_plan_keeps_indices_and_fingerprint(base, model_dir, tmp_path):
    """Other calibration text and group size: selection alone picks other columns, the plan the
    same ones, given as the checkpoint dir or as a plan file."""
    calib = _calib(tmp_path / "other.txt", 7)
    plan_file = tmp_path / "base.plan.json"
    assert main(["plan", "export", str(base), str(plan_file)]) == 0
    selected = tmp_path / "selected"
    argv = _quantize(model_dir, selected, calib, "--weak-columns", "3", "--groupsize", "32")
    assert main(argv) == 0
    assert plan_of_checkpoint(selected) != plan_of_checkpoint(base)  # the test can fail
    for source in (str(base), str(plan_file)):
        out = tmp_path / f"from-{len(source)}"
        argv = _quantize(model_dir, out, calib, "--groupsize", "32", "--weak-columns-from", source)
        assert main(argv) == 0
        assert plan_of_checkpoint(out) == plan_of_checkpoint(base)
        assert base_fingerprint(load_checkpoint(out)) == base_fingerprint(load_checkpoint(base))
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        assert config["allocation"] == "plan" and config["group_size"] == 32


def test_a_plan_for_other_shapes_is_refused_in_one_line(base, tmp_path, capsys):
    config = tiny_config("llama")
    config.intermediate_size = 96
    other = tmp_path / "wider"
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    out = tmp_path / "out"
    argv = _quantize(other, out, _calib(tmp_path / "c.txt", 0), "--weak-columns-from", str(base))
    message = _fail(capsys, argv)
    assert "model.layers.0.mlp.gate_proj is 64x96 here, 64x128 in the plan" in message
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--target-bits", "3.05"], "--target-bits"),
        (["--weak-columns", "2"], "--weak-columns"),
        (["--allocation", "global"], "--allocation"),
        (["--budget", "whole"], "--budget"),
        (["--method", "gptq"], "--method owq"),
    ],
)
def test_options_the_plan_replaces_are_refused(base, model_dir, tmp_path, capsys, extra, named):
    argv = _quantize(model_dir, tmp_path / "o", "austen", "--weak-columns-from", str(base), *extra)
    assert named in _fail(capsys, argv)
    assert not (tmp_path / "o").exists()


def test_an_edited_or_missing_plan_is_refused(base, model_dir, tmp_path, capsys):
    plan_file = tmp_path / "p.json"
    assert main(["plan", "export", str(base), str(plan_file)]) == 0
    data = json.loads(plan_file.read_text())
    data["layers"][0]["weak_idx"][0] += 1
    plan_file.write_text(json.dumps(data))
    argv = _quantize(model_dir, tmp_path / "o", "austen", "--weak-columns-from", str(plan_file))
    assert "edited file?" in _fail(capsys, argv)
    argv[-1] = str(tmp_path / "nope.json")
    assert "neither a checkpoint dir nor a plan file" in _fail(capsys, argv)
    data["layers"][0]["weak_idx"] = [5, 5]
    plan_file.write_text(json.dumps(data | {"fingerprint": None}))
    with pytest.raises(PlanError, match="sorted and unique"):
        read_plan_file(plan_file)


def test_given_weak_columns_reproduce_the_selected_ones_exactly():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(32, 64, generator=gen)
    X = torch.randn(512, 64, generator=gen) * (1 + 20 * (torch.rand(64, generator=gen) > 0.9))
    H = 2 * X.t() @ X / X.shape[0]
    settings = QuantizeSettings(method="owq", weak_columns=4).resolved()
    selected = gptq_linear(W, H, 4, settings)
    given = gptq_linear(W, H, 4, settings, selected.weak_idx)
    assert torch.equal(given.codes, selected.codes) and torch.equal(given.oweight, selected.oweight)
    other = gptq_linear(W, H, 4, settings, torch.tensor([0, 1, 2, 3]))
    assert other.weak_idx.tolist() == [0, 1, 2, 3] and not torch.equal(other.codes, selected.codes)
