"""End to end on tiny models: outlier channels found in a model, determinism, every family loads
and evaluates, bits from bytes on disk, and the report."""

from __future__ import annotations

import json

import pytest
import torch
from quant_helpers import synthetic_ids
from tiny_models import tiny_model

from owq.kernels.bits import checkpoint_bits
from owq.kernels.checkpoint import load_checkpoint
from owq.kernels.families import family_of, quantized_linear_paths
from owq.quantizer.api import quantize, read_report
from owq.quantizer.perplexity import perplexity

FAST = {"nsamples": 8, "seqlen": 32, "batch_size": 4}
OUTLIERS = (5, 20, 41)


def _quantize(model, out, **fields):
    return quantize(
        model, out, calibration_ids=synthetic_ids(4000), progress=False, **(FAST | fields)
    )


def test_owq_finds_outlier_channels_of_a_model(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():  # hidden states of block 0's attention input carry outliers
        model.model.layers[0].input_layernorm.weight[list(OUTLIERS)] *= 50.0
    out = _quantize(model, tmp_path / "owq", method="owq", weak_columns=3)
    q = load_checkpoint(out)
    for name in ("q_proj", "k_proj", "v_proj"):
        layer = q.model.layers[0].self_attn.get_submodule(name)
        assert layer.outlier_idx.tolist() == list(OUTLIERS), name
    report = read_report(out)
    assert {layer["weak_columns"] for layer in report["layers"]} == {3}


def test_same_seed_gives_byte_identical_checkpoint(tmp_path):
    a = _quantize(tiny_model("llama"), tmp_path / "a", method="owq", target_bits=3.1)
    b = _quantize(tiny_model("llama"), tmp_path / "b", method="owq", target_bits=3.1)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    configs = [json.loads((d / "config.json").read_text()) for d in (a, b)]
    for config in configs:  # the served name is the output dir's: a and b differ by it alone
        config["quantization_config"].pop("name")
    assert configs[0] == configs[1]
    c = _quantize(tiny_model("llama"), tmp_path / "c", method="owq", target_bits=3.1, seed=1)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "kind, fields",
    [
        ("llama", {"method": "owq", "target_bits": 3.1, "allocation": "global"}),
        ("opt", {"method": "gptq", "act_order": True, "groupsize": 32}),
        ("gpt2", {"method": "owq", "weak_columns": 2, "true_sequential": False}),
        ("gpt2", {"method": "rtn", "wbits": 4}),
    ],
)
def test_families_quantize_load_and_evaluate(tmp_path, kind, fields):
    float_model = tiny_model(kind)
    ids = synthetic_ids(256, seed=3)
    with torch.no_grad():
        ppl_float = perplexity(float_model, ids, 32, progress=False).ppl
    out = _quantize(tiny_model(kind), tmp_path / kind, **fields)
    q = load_checkpoint(out)
    paths = quantized_linear_paths(q, family_of(q.config))
    assert all(type(q.get_submodule(p)).__name__ == "OWQLinear" for p in paths)
    with torch.no_grad():
        ppl = perplexity(q, ids, 32, progress=False).ppl
    assert ppl == pytest.approx(ppl_float, rel=0.25)
    bits = checkpoint_bits(out)
    file_bytes = (out / "model.safetensors").stat().st_size
    assert bits.file_bytes == file_bytes
    assert bits.bits_per_weight_total == pytest.approx(file_bytes * 8 / bits.parameters)
    report = json.loads((out / "owq_report.json").read_text())
    assert report["bits"]["bits_per_weight_total"] == pytest.approx(bits.bits_per_weight_total)
    assert len(report["layers"]) == len(paths)
    wbits = fields.get("wbits", 3)
    assert wbits < bits.bits_per_weight_linear < wbits + 1.5


def test_global_allocation_matches_the_uniform_budget(tmp_path):
    uni = read_report(_quantize(tiny_model("opt"), tmp_path / "u", target_bits=3.2))
    glo = read_report(
        _quantize(tiny_model("opt"), tmp_path / "g", target_bits=3.2, allocation="global")
    )

    def elements(report):
        return sum(x["weak_columns"] * x["out_features"] for x in report["layers"])

    assert elements(glo) <= elements(uni)
    assert elements(glo) > elements(uni) - 4 * 64
    assert abs(glo["paper_bits"] - uni["paper_bits"]) < 0.05
