"""OWQ weak columns: sensitivity_j = λ_j·‖W_:,j − Q(W)_:,j‖² (paper Eq. 6) and the top-k choice.

Pure tensor maths on one weight matrix and its Hessian diagonal; knows nothing of models.
"""

from __future__ import annotations

import torch

from owq.kernels.grid import fake_quantize
from owq.kernels.packing import group_index

from .search import fit_group_params


def column_sensitivity(
    W: torch.Tensor,
    H_diag: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    search: bool,
    out_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """sensitivity_j = λ_j·‖ΔW_:,j‖² with λ = diag(H), Q the layer's own grid (Eq. 6); [in].
    With `out_weight` f [out] (the Fisher of each output channel, `fisher.py`), the squared error
    of each row is weighted by it: λ_j·Σ_o f_o ΔW_oj², a loss-unit score comparable across
    layers."""
    W = W.to(torch.float32)
    scale, zero = fit_group_params(W, bits, group_size, sym, search)  # [G, out]
    groups = group_index(W.shape[1], group_size)
    s, z = scale[groups].t(), zero[groups].t()  # [out, in]
    err = (W - fake_quantize(W, s, z, bits)).square()
    if out_weight is not None:
        err = err * out_weight.to(torch.float32)[:, None]
    return H_diag.to(torch.float32) * err.sum(0)


def select_weak_columns(sensitivity: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (sorted, int64) of the k most sensitive columns; ties go to the lower index."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    order = torch.sort(sensitivity, descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def processing_order(H_diag: torch.Tensor, weak: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Column order for GPTQ: non-weak columns (by descending λ with act-order), weak ones last."""
    in_f = H_diag.numel()
    is_weak = torch.zeros(in_f, dtype=torch.bool)
    is_weak[weak] = True
    rest = torch.arange(in_f)[~is_weak]
    if act_order:
        rest = rest[torch.sort(H_diag[rest], descending=True, stable=True).indices]
    return torch.cat([rest, weak.to(torch.long)])
