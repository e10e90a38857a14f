"""Torch twins of the CUDA kernels: same signatures, the path the CPU runs and tests compare to.

Knows the packed layout (``packing``) and nothing about models, checkpoints or serving.
"""

from __future__ import annotations

import torch

from .packing import dequantize


def weak_columns_product(
    x: torch.Tensor,
    outlier_idx: torch.Tensor,
    oweight: torch.Tensor,
    adapter_table: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weak-column term ``x[..., idx] @ O[slot(row)]``.

    x: float [B, ..., in]; outlier_idx: int [k]; oweight: [k, out] (slot 0, the base's own);
    adapter_table: [S, k, out] (slot s >= 1 is ``adapter_table[s - 1]``); slots: int [B] or None
    (all rows slot 0). Returns float [B, ..., out] in x's dtype.
    """
    xk = x.index_select(-1, outlier_idx.to(torch.long))
    if slots is None or adapter_table is None or adapter_table.shape[0] == 0:
        return xk @ oweight.to(x.dtype)
    table = torch.cat([oweight.unsqueeze(0), adapter_table], 0).to(x.dtype)  # [S+1, k, out]
    per_row = table.index_select(0, slots.to(torch.long))  # [B, k, out]
    batch = x.shape[0]
    flat = xk.reshape(batch, -1, xk.shape[-1])  # [B, T, k]
    return torch.bmm(flat, per_row).reshape(*x.shape[:-1], per_row.shape[-1])


def owq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    outlier_idx: torch.Tensor,
    oweight: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    adapter_table: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequant(Q) + x[:, idx] @ O[slot(row)] + bias, all in x's dtype.

    x: [M, in] (or [B, T, in] with slots [B]); qweight int32 [in*bits/32, out]; scales fp16
    [groups, out]; qzeros int32 [groups, ceil(out/32)*bits]; outlier_idx int32 [k];
    oweight fp16 [k, out]; bias [out] or None. Returns [M, out].
    """
    weight = dequantize(qweight, scales, qzeros, bits, group_size, dtype=x.dtype)
    y = x @ weight
    if outlier_idx.numel():
        y = y + weak_columns_product(x, outlier_idx, oweight, adapter_table, slots)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y
