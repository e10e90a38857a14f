"""Torch twins of the helper kernels in `cuda_ops` that have no twin in `reference`.

Same signatures as the kernel wrappers, used by tests to compare against and by anyone who needs
the same op without a GPU. Knows the packed layout through `reference` only; nothing of CuPy,
models or serving.
"""

from __future__ import annotations

import torch

from . import reference


def dequant_gemv(
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
    """Twin of `cuda_ops.dequant_gemv`: the full layer op, x [M, in] -> [M, out]."""
    return reference.owq_matmul(
        x, qweight, scales, qzeros, outlier_idx, oweight, bits, group_size,
        bias, adapter_table, slots,
    )  # fmt: skip


def dequantize_fp16(
    qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Twin of `cuda_ops.dequantize_fp16`: float16 [in, out], (q - z) * s rounded once."""
    return reference.dequantize(qweight, scales, qzeros, bits, group_size, dtype=torch.float16)


def weak_columns_sgmv(
    x: torch.Tensor,
    outlier_idx: torch.Tensor,
    oweight: torch.Tensor,
    adapter_table: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Twin of `cuda_ops.weak_columns_sgmv`: out (+)= x[:, idx] @ O[slot[b]] (+ bias).

    x: [M, in]; returns [M, out_features] in x's dtype; `out` [M, out_features] is added to and
    written in place when given.
    """
    # y: [M, out_features], computed in fp32 like the kernel
    y = reference.weak_columns_product(
        x.float(), outlier_idx, oweight.float(),
        None if adapter_table is None else adapter_table.float(), slots,
    )  # fmt: skip
    if bias is not None:
        y = y + bias.float()
    if out is None:
        return y.to(x.dtype)
    out.copy_((out.float() + y).to(out.dtype))
    return out
