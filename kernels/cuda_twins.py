"""Torch twins of the helper kernels in `cuda_ops` that have no twin in `reference`.

Same signatures as the kernel wrappers, used by tests to compare against and by anyone who needs
the same op without a GPU. Knows the packed layout through `reference` only; nothing of CuPy,
models or serving.
"""

from __future__ import annotations

import torch

from . import reference
from .types import PackedWeight, WeakColumns


def dequant_gemv(
    x: torch.Tensor,
    packed: PackedWeight,
    weak: WeakColumns,
    bias: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Twin of `cuda_ops.dequant_gemv`: the full layer op, x [M, in] -> [M, out]."""
    return reference.owq_matmul(x, packed, weak, bias, slots)


def dequantize_fp16(packed: PackedWeight) -> torch.Tensor:
    """Twin of `cuda_ops.dequantize_fp16`: float16 [in, out], (q - z) * s rounded once."""
    return packed.dequantize(torch.float16)


def weak_columns_sgmv(
    x: torch.Tensor,
    weak: WeakColumns,
    slots: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Twin of `cuda_ops.weak_columns_sgmv`: out (+)= x[:, idx] @ table[slot[b]] (+ bias).

    x: [M, in]; returns [M, out_features] in x's dtype; `out` [M, out_features] is added to and
    written in place when given.
    """
    table = WeakColumns(weak.idx, weak.table.float())
    y = reference.weak_columns_product(x.float(), table, slots)  # fp32 like the kernel
    if bias is not None:
        y = y + bias.float()
    if out is None:
        return y.to(x.dtype)
    out.copy_((out.float() + y).to(out.dtype))
    return out
