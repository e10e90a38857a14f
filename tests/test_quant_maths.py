"""GPTQ against a brute-force OBQ reference; OWQ weak columns on activation outliers; search."""

from __future__ import annotations

import pytest
import torch

from owq.quantizer.gptq import gptq
from owq.quantizer.layer import gptq_linear, rtn_linear
from owq.quantizer.search import minmax_params, search_params
from owq.quantizer.settings import QuantizeSettings
from owq.quantizer.weak_columns import column_sensitivity, select_weak_columns

OUTLIERS = (3, 17, 40)


def obq_reference(W, H, scale, zero, bits, percdamp):
    """Column by column: round, spread the error with the full inverse Hessian, then drop the
    column from H⁻¹ by its Schur complement (the OBS update, no Cholesky, no blocks)."""
    W = W.clone().double()
    H = H.clone().double()
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    maxq = 2**bits - 1
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        w = W[:, i]
        q = (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero) * scale
        Q[:, i] = q
        err = (w - q) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
        Hinv = Hinv - Hinv[:, i : i + 1] @ Hinv[i : i + 1, :] / Hinv[i, i]
    return Q


def _layer_data(seed=0, rows=8, cols=16, n=256):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen)
    X = torch.randn(n, cols, generator=gen) @ (
        torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen)
    )
    return W, 2 * X.t() @ X / n


@pytest.mark.parametrize("block_size", [128, 4, 3])
def test_gptq_matches_bruteforce_obq(block_size):
    W, H = _layer_data()
    scale, zero = minmax_params(W, 3)
    ref = obq_reference(W, H, scale.double()[:, None].squeeze(1), zero.double(), 3, 0.01)
    col_scale = scale[:, None].expand_as(W).contiguous()
    col_zero = zero[:, None].expand_as(W).contiguous()
    res = gptq(W, H, col_scale, col_zero, 3, W.shape[1], 0.01, block_size=block_size)
    torch.testing.assert_close(res.Q.double(), ref, atol=1e-4, rtol=1e-4)
    dequant = (res.codes - zero[:, None]) * scale[:, None]
    torch.testing.assert_close(dequant, res.Q)


def _outlier_layer(seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(32, 64, generator=gen) * 0.05
    X = torch.randn(2048, 64, generator=gen)
    X[:, list(OUTLIERS)] *= 50.0  # activation outliers in known input channels
    return W, X, 2 * X.t() @ X / X.shape[0]


def _output_error(W, W_hat, X):
    return float(((X @ W.t()) - (X @ W_hat.t())).square().sum())


def test_owq_picks_outlier_channels_and_beats_gptq_and_rtn():
    W, X, H = _outlier_layer()
    sens = column_sensitivity(W, torch.diag(H), 3, -1, False, True)
    assert set(select_weak_columns(sens, 3).tolist()) == set(OUTLIERS)
    owq = gptq_linear(W, H, 3, QuantizeSettings(method="owq", weak_columns=3).resolved())
    assert owq.weak_idx.tolist() == sorted(OUTLIERS)
    gptq_res = gptq_linear(W, H, 0, QuantizeSettings(method="gptq").resolved())
    rtn = rtn_linear(W, QuantizeSettings(method="rtn").resolved())
    errors = [_output_error(W, r.weight_hat, X) for r in (owq, gptq_res, rtn)]
    assert errors[0] < errors[1] < errors[2], errors
    assert errors[0] < 0.5 * errors[1]


def test_gptq_options_run_and_keep_the_grid():
    W, X, H = _outlier_layer(1)
    for fields in (
        {"act_order": True},
        {"groupsize": 32},
        {"groupsize": 32, "act_order": True},
        {"sym": True},
        {"search": True},
    ):
        res = gptq_linear(W, H, 0, QuantizeSettings(method="gptq", **fields).resolved())
        assert res.codes.min() >= 0 and res.codes.max() <= 7
        grid = {k: v for k, v in fields.items() if k in ("groupsize", "sym", "search")}
        rtn = rtn_linear(W, QuantizeSettings(method="rtn", **grid).resolved())
        assert _output_error(W, res.weight_hat, X) < _output_error(W, rtn.weight_hat, X), fields
        groups = 1 if fields.get("groupsize", -1) == -1 else 64 // fields["groupsize"]
        assert res.scales.shape == (groups, 32)


def test_weak_columns_carry_compensation():
    W, H = _layer_data(seed=2, rows=16, cols=32)  # correlated inputs: compensation is visible
    res = gptq_linear(W, H, 4, QuantizeSettings(method="owq", weak_columns=4).resolved())
    weak = res.weak_idx.tolist()
    # GPTQ's error feedback flows into the fp16 columns: they differ from the original weights
    assert (res.oweight - W[:, weak]).abs().max() > 1e-2
    torch.testing.assert_close(res.weight_hat[:, weak], res.oweight.half().float())
    assert (res.codes[:, weak] >= 0).all()


def test_search_truncates_and_never_loses_to_minmax():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen)
    w[:, 0] = 8.0  # one far outlier per row: truncation pays off
    for bits in (2, 3, 4):
        for sym in (False, True):
            s_mm, z_mm = minmax_params(w, bits, sym)
            s_se, z_se = search_params(w, bits, sym)

            def err(s, z, bits=bits):
                q = (
                    torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, 2**bits - 1)
                    - z[:, None]
                )
                return float((q * s[:, None] - w).square().sum())

            assert err(s_se, z_se) <= err(s_mm, z_mm) * (1 + 1e-6)
            assert torch.equal(s_se, s_se.half().float())  # scales are stored as fp16
    assert (s_se < s_mm).all()
