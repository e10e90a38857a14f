"""Bits accounting from the bytes on disk."""

import pytest
from tiny_models import rtn_swap, tiny_model

from owq.kernels.bits import checkpoint_bits
from owq.kernels.checkpoint import QuantConfig, save_checkpoint


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("bits,group,weak", [(3, -1, 0), (3, 32, 4), (4, 64, 8), (2, 32, 1)])
def test_layer_and_total_bits(tmp_path, kind, bits, group, weak):
    float_params = sum(p.numel() for p in tiny_model(kind).parameters())
    model = rtn_swap(tiny_model(kind), bits, group, weak)
    path = save_checkpoint(model, tmp_path / "ckpt", QuantConfig(bits, group))
    report = checkpoint_bits(path)
    assert report.parameters == float_params
    assert report.file_bytes == (path / "model.safetensors").stat().st_size
    assert report.bits_per_weight_total == pytest.approx(report.file_bytes * 8 / float_params)
    for layer in report.layers:
        i, o, k = layer.in_features, layer.out_features, layer.weak_columns
        groups = 1 if group == -1 else i // group
        stored = i * bits // 8 * o + 2 * groups * o + 4 * groups * -(-o // 32) * bits
        stored += 2 * k * o + 4 * k
        assert k == weak
        assert layer.true_bits == pytest.approx(stored * 8 / (i * o))
        assert layer.nominal_bits == pytest.approx(bits + 16 * k / i)
        assert layer.true_bits > layer.nominal_bits
    linear = sum(lb.true_bits * lb.in_features * lb.out_features for lb in report.layers)
    weights = sum(lb.in_features * lb.out_features for lb in report.layers)
    assert report.bits_per_weight_linear == pytest.approx(linear / weights)
