"""Calibration window samplers (ours and the reference scripts') and the grid's scale rounding."""

from __future__ import annotations

import random

import pytest
import torch
from quant_helpers import synthetic_ids
from tiny_models import tiny_model

from owq.quantizer.api import quantize, read_report
from owq.quantizer.calibration import calibration_windows
from owq.quantizer.search import _grid_for
from owq.quantizer.settings import QuantizeSettings


def _starts(windows: torch.Tensor) -> list[int]:
    return windows[:, 0].tolist()  # ids = arange: a window's first id is its offset


def test_torch_sampler_keeps_its_draw():
    """The default sampler's offsets are those every existing checkpoint was made with."""
    ids = torch.arange(1000)
    assert _starts(calibration_windows(ids, 5, 100, 3)) == [594, 611, 275, 123, 650]
    assert _starts(calibration_windows(ids, 5, 100, 3, "torch")) == [594, 611, 275, 123, 650]
    assert _starts(calibration_windows(ids, 3, 1000, 0)) == [0, 0, 0]  # N == seqlen: one window


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_python_sampler_draws_what_the_reference_scripts_draw(seed):
    """random.seed(seed), then random.randint(0, N - seqlen - 1) per window, as in the GPTQ and
    OWQ reference data loaders; the global random state is left alone."""
    ids = torch.arange(5000)
    random.seed(seed)
    expected = [random.randint(0, 5000 - 512 - 1) for _ in range(16)]
    state = random.getstate()
    windows = calibration_windows(ids, 16, 512, seed, "python")
    assert random.getstate() == state
    assert _starts(windows) == expected
    assert torch.equal(windows[3], ids[expected[3] : expected[3] + 512])
    assert _starts(calibration_windows(ids, 16, 512, seed, "torch")) != expected


def test_python_sampler_needs_one_token_more_than_a_window():
    ids = torch.arange(100)
    assert _starts(calibration_windows(ids, 4, 99, 0, "python")) == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="seqlen \\+ 1 = 101"):
        calibration_windows(ids, 4, 100, 0, "python")
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows(ids, 4, 101, 0, "torch")


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="--sampler must be one of"):
        QuantizeSettings(sampler="numpy").resolved()
    with pytest.raises(ValueError, match="--sampler must be torch or python"):
        calibration_windows(torch.arange(100), 1, 10, 0, "numpy")


def test_sampler_reaches_the_checkpoint(tmp_path):
    fields = {"method": "gptq", "nsamples": 4, "seqlen": 32, "batch_size": 4, "progress": False}
    ids = synthetic_ids(4000)
    a = quantize(tiny_model("llama"), tmp_path / "a", calibration_ids=ids, **fields)
    b = quantize(
        tiny_model("llama"), tmp_path / "b", calibration_ids=ids, sampler="python", **fields
    )
    assert read_report(a)["settings"]["sampler"] == "torch"
    assert read_report(b)["settings"]["sampler"] == "python"
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()


def test_grid_scale_is_fp16_unless_asked_for_fp32():
    """Default: the scale is rounded to fp16 (the stored dtype) before the zero point is chosen;
    fp16_scale=False is the reference min-max grid: scale = (max - min) / maxq in fp32,
    zero = round(-min / scale)."""
    lo = torch.tensor([-0.0123457, -1.0, -0.3])
    hi = torch.tensor([0.0345679, 2.0, 0.7000001])
    exact = (hi - lo) / 7
    scale, zero = _grid_for(lo, hi, 7, False)
    assert torch.equal(scale, exact.half().float())
    assert not torch.equal(scale, exact)
    assert torch.equal(zero, torch.round(-lo / scale))
    scale32, zero32 = _grid_for(lo, hi, 7, False, fp16_scale=False)
    assert torch.equal(scale32, exact)
    assert torch.equal(zero32, torch.round(-lo / exact))
