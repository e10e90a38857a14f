"""Quantize one linear layer (RTN, GPTQ or OWQ) from its weight and Hessian; build its OWQLinear.

The OWQ steps in paper order: sensitivities with the layer's own grid → top-k weak columns →
grid (min-max or truncation search) fit on the remaining columns → weak columns permuted last →
GPTQ → the compensated weak columns kept as fp16. Knows nothing of blocks, hooks or files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from owq.kernels import OWQLinear
from owq.kernels.grid import round_to_codes

from .gptq import gptq
from .hessian import output_energy, output_error
from .search import fit_group_params, fit_params
from .settings import QuantizeSettings
from .weak_columns import column_sensitivity, processing_order, select_weak_columns


@dataclass
class LayerResult:
    codes: torch.Tensor  # int64 [out, in], original column order
    scales: torch.Tensor  # float32 (fp16-exact) [groups, out]
    zeros: torch.Tensor  # int64 [groups, out]
    weak_idx: torch.Tensor  # int64 [k], sorted
    oweight: torch.Tensor  # float32 [out, k] compensated weak columns
    weight_hat: torch.Tensor  # float32 [out, in]: exactly what the saved OWQLinear computes
    rel_error: float | None  # ‖WX − ŴX‖² / ‖WX‖² on the calibration inputs (None for RTN)
    gptq_loss: float | None
    seconds: float

    def to_module(self, bits: int, group_size: int, bias: torch.Tensor | None) -> OWQLinear:
        return OWQLinear.from_codes(
            self.codes, self.scales, self.zeros, bits, group_size, self.weak_idx, self.oweight, bias
        )


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """[in] group of each input column (no g_idx: i // group_size)."""
    size = in_features if group_size == -1 else group_size
    return torch.arange(in_features) // size


def dequantized(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    weak_idx: torch.Tensor,
    oweight: torch.Tensor,
) -> torch.Tensor:
    """The effective [out, in] weight: (q − z)·s, weak columns from fp16-rounded oweight."""
    g = group_index(codes.shape[1], group_size)
    W_hat = (codes.to(torch.float32) - zeros[g].t()) * scales[g].t()
    if weak_idx.numel():
        W_hat[:, weak_idx] = oweight.to(torch.float16).to(torch.float32)
    return W_hat


def rtn_linear(weight: torch.Tensor, settings: QuantizeSettings) -> LayerResult:
    """Round-to-nearest on the (min-max or searched) grid; no calibration data."""
    start = time.perf_counter()
    W = weight.to(torch.float32)
    bits, gs = settings.wbits, settings.groupsize
    scales, zeros = fit_group_params(W, bits, gs, settings.sym, bool(settings.search))
    g = group_index(W.shape[1], gs)
    codes = round_to_codes(W, scales[g].t(), zeros[g].t(), bits)
    empty = torch.empty(0, dtype=torch.long)
    none = torch.empty(W.shape[0], 0)
    W_hat = dequantized(codes, scales, zeros, gs, empty, none)
    return LayerResult(
        codes, scales, zeros, empty, none, W_hat, None, None, time.perf_counter() - start
    )


def gptq_linear(
    weight: torch.Tensor,
    H: torch.Tensor,
    k: int,
    settings: QuantizeSettings,
    weak_idx: torch.Tensor | None = None,
) -> LayerResult:
    """GPTQ (k = 0) or OWQ (k weak columns) on weight [out, in] with H [in, in].

    `weak_idx` (int64 [k], sorted): these weak columns instead of the k most sensitive ones (a
    weak-column plan), so that every base quantized with one plan shares its adapters.
    """
    start = time.perf_counter()
    W = weight.to(torch.float32)
    bits, gs, sym, search = settings.wbits, settings.groupsize, settings.sym, bool(settings.search)
    lam = torch.diag(H).clone()
    weak = torch.empty(0, dtype=torch.long)
    if weak_idx is not None:
        weak = weak_idx.to(torch.long)
    elif k > 0:
        sens = column_sensitivity(W, lam, bits, gs, sym, search)
        weak = select_weak_columns(sens, k)
    W_masked, lam_masked = W.clone(), lam.clone()
    W_masked[:, weak], lam_masked[weak] = 0.0, 0.0
    perm = processing_order(lam, weak, settings.act_order)
    permuted = not torch.equal(perm, torch.arange(W.shape[1]))
    g = group_index(W.shape[1], gs)
    refit = None
    if permuted or gs == -1:  # static groups: grid fit up front, in the original column order
        scales, zeros = fit_group_params(W_masked, bits, gs, sym, search, lam_masked)
        col_scale, col_zero = scales[g].t()[:, perm], zeros[g].t()[:, perm]
    else:  # GPTQ's dynamic groups: fit each group on the compensated weights when it starts

        def refit(col: int, block: torch.Tensor):
            return fit_params(block, bits, sym, search, lam[col : col + block.shape[1]])

        col_scale, col_zero = torch.ones_like(W), torch.zeros_like(W)
    n_quant = W.shape[1] - weak.numel()
    res = gptq(
        W[:, perm], H[perm][:, perm], col_scale, col_zero, bits, n_quant,
        settings.percdamp, gs, refit,
    )  # fmt: skip
    inverse = torch.argsort(perm)
    codes = torch.zeros_like(W, dtype=torch.int64)
    codes[:, :n_quant] = res.codes
    codes = codes[:, inverse]
    if refit is not None:
        scales, zeros = res.scale[:, ::gs].t().contiguous(), res.zero[:, ::gs].t().contiguous()
    oweight = res.Q[:, inverse][:, weak]
    zeros = zeros.to(torch.int64)
    W_hat = dequantized(codes, scales, zeros, gs, weak, oweight)
    rel = output_error(W, W_hat, H) / max(output_energy(W, H), 1e-30)
    return LayerResult(
        codes, scales, zeros, weak, oweight, W_hat, rel, res.loss, time.perf_counter() - start
    )
