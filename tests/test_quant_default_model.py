"""The real default model at reduced calibration: OWQ-3.05 < GPTQ-3 < RTN-3 in perplexity."""

from __future__ import annotations

import pytest

SETTINGS = {"nsamples": 16, "seqlen": 256}


@pytest.mark.slow
def test_owq_beats_gptq_beats_rtn_on_persuasion(tmp_path):
    from owq.builtin.model import ModelMissing, default_gguf_path
    from owq.quantizer.api import quantize
    from owq.quantizer.eval_cli import evaluate_one
    from owq.quantizer.texts import eval_text

    try:
        default_gguf_path()
    except ModelMissing as e:
        pytest.skip(str(e))
    text = eval_text("persuasion")
    ppl = {}
    for name, fields in {
        "rtn": {"method": "rtn", "wbits": 3},
        "gptq": {"method": "gptq", "wbits": 3},
        "owq": {"method": "owq", "wbits": 3, "target_bits": 3.05},
    }.items():
        out = quantize("default", tmp_path / name, progress=False, **fields, **SETTINGS)
        ppl[name] = evaluate_one(str(out), text, 512, 16)["ppl"]
    assert ppl["owq"] < ppl["gptq"] < ppl["rtn"], ppl
