"""Value types of a quantized linear layer that travel together through every kernel and twin.

`PackedWeight` is the dense part in the GPTQ layout of `packing.py`; `WeakColumns` are the weak
input columns with one slot table of their values, `[S+1, k, out]`, slot 0 the base's own
columns and slot s >= 1 an adapter's. Kernels (`cuda_ops`, `cpu_ops`) and their torch twins
(`reference`, `cuda_twins`) take these instead of long positional signatures. Plain data: knows the
layout's shape rules, nothing about modules, models or devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import dequantize, group_index


@dataclass(frozen=True)
class PackedWeight:
    """qweight: int32 [in*bits/32, out]; scales: float16 [groups, out];
    qzeros: int32 [groups, ceil(out/32)*bits]; dense W[i, o] = (q - z[g(i)]) * s[g(i)]."""

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor
    bits: int
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 32 // self.bits

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def group_index(self) -> torch.Tensor:
        """long [in]: the group of every input row."""
        return group_index(self.in_features, self.group_size, self.qweight.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense weight [in, out] in `dtype`."""
        return dequantize(self.qweight, self.scales, self.qzeros, self.bits, self.group_size, dtype)


@dataclass(frozen=True)
class WeakColumns:
    """idx: int32 [k] sorted unique input columns; table: [S+1, k, out] their values per slot
    (slot 0 = the base's own, s >= 1 = adapter slot s)."""

    idx: torch.Tensor
    table: torch.Tensor

    @property
    def k(self) -> int:
        return self.idx.numel()

    @property
    def num_slots(self) -> int:
        """Adapter slots besides slot 0."""
        return self.table.shape[0] - 1

    @property
    def out_features(self) -> int:
        return self.table.shape[-1]

    @property
    def base(self) -> torch.Tensor:
        """[k, out]: slot 0, the base's own columns."""
        return self.table[0]

    def check_slots(self, slots: torch.Tensor) -> None:
        """Raise ValueError unless every slot id lies in [0, S]: call where slot ids are set (one
        host sync for device tensors). The kernels make a row with a bad slot NaN instead."""
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) > self.num_slots):
            raise ValueError(
                f"slot ids must lie in [0, {self.num_slots}], got [{int(slots.min())}, "
                f"{int(slots.max())}]"
            )

    def check_indices(self, in_features: int) -> None:
        """Raise ValueError unless idx is int32 [k], sorted, unique, inside [0, in_features):
        call where weak columns are loaded. The kernels make a row NaN on an index outside."""
        idx = self.idx
        if idx.dim() != 1 or idx.dtype != torch.int32:
            raise ValueError(f"outlier_idx must be int32 [k], got {idx.dtype} {tuple(idx.shape)}")
        if problem := index_problem(idx, in_features):
            raise ValueError(f"outlier_idx {problem}")


def index_problem(idx: torch.Tensor, size: int) -> str | None:
    """Why the indices idx [k] are not sorted, unique and inside [0, size), or None when they
    are: the one check of weak columns, protected rows and plans."""
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        return f"must lie in [0, {size}), got [{int(idx.min())}, {int(idx.max())}]"
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        return "must be sorted and unique"
    return None
