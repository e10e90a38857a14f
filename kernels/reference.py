"""Torch twins of the layer kernels: same signatures, the path autograd and the tests compare to.

Knows the packed layout (`types`, `packing`) and nothing about models, checkpoints or serving.
"""

from __future__ import annotations

import torch

from .types import PackedWeight, WeakColumns


def weak_columns_product(
    x: torch.Tensor, weak: WeakColumns, slots: torch.Tensor | None = None
) -> torch.Tensor:
    """Weak-column term ``x[..., idx] @ table[slot(row)]``.

    x: float [B, ..., in]; weak.table: [S+1, k, out]; slots: int [B] (one slot per leading row,
    each in [0, S]) or None (every row slot 0). Returns [B, ..., out] in x's dtype.
    """
    shape = (*x.shape[:-1], weak.out_features)
    if weak.k == 0:
        return x.new_zeros(shape)
    xk = x.index_select(-1, weak.idx.to(torch.long))  # [B, ..., k]
    if slots is None:
        return xk @ weak.base.to(x.dtype)
    if slots.dim() != 1 or slots.shape[0] != x.shape[0]:
        raise ValueError(f"slots has shape {tuple(slots.shape)}, expected [{x.shape[0]}]")
    per_row = weak.table.index_select(0, slots.to(torch.long)).to(x.dtype)  # [B, k, out]
    flat = xk.reshape(x.shape[0], -1, weak.k)  # [B, T, k]
    return torch.bmm(flat, per_row).reshape(shape)


def owq_matmul(
    x: torch.Tensor,
    packed: PackedWeight,
    weak: WeakColumns,
    bias: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequant(Q) + x[..., idx] @ table[slot(row)] + bias, all in x's dtype.

    x: [M, in] (or [B, ..., in] with slots [B]); bias: [out] or None. Returns [..., out].
    """
    y = x @ packed.dequantize(x.dtype)
    if weak.k:
        y = y + weak_columns_product(x, weak, slots)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y
