"""`SlotProjection`: an `OWQLinear` called as `layer(x, slots)`, with a lean CPU adapter path.

The layer computes the dense part once for the batch plus slot 0's weak columns; on the CPU the
rows on adapter slots then add `x[..., idx] @ (O[slot] - O[0])` from an fp32 delta table kept in
sync with the layer's slot table (`refresh` after each slot write): a decode step is one GEMM
against the table with a one-hot expanded input (no per-row gather, no per-call fp16 casts).
Off the CPU the layer's own kernels take `slots` directly. Knows nothing about models or requests.
"""

from __future__ import annotations

import torch
from torch import nn

from owq.kernels import OWQLinear


class SlotProjection(nn.Module):
    def __init__(self, layer: OWQLinear):
        super().__init__()
        self.layer = layer
        self.delta: torch.Tensor | None = None  # fp32 [S+1, k, out]; row 0 = 0
        self.sync()

    def sync(self) -> None:
        """Rebuild the whole delta table from the layer's slot table."""
        layer = self.layer
        if not layer.num_weak or not layer.num_slots or layer.qweight.is_cuda:
            self.delta = None
            return
        base = layer.oweight.detach().float()
        table = layer.adapter_table.float() - base
        self.delta = torch.cat([torch.zeros_like(base)[None], table]).contiguous()

    def refresh(self, slot: int) -> None:
        """After `layer.set_slot(slot, ...)`: recompute that slot's delta."""
        if self.delta is None or self.delta.shape[0] != self.layer.num_slots + 1:
            self.sync()
            return
        layer = self.layer
        self.delta[slot] = layer.adapter_table[slot - 1].float() - layer.oweight.detach().float()

    def forward(self, x: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, T, in]; slots: long [B] or None (every row on slot 0)
        if slots is None or not self.layer.num_weak:
            return self.layer(x)
        if self.delta is None:
            return self.layer(x, slots)
        return self.layer(x) + self._adapter_delta(x, slots)

    def _adapter_delta(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        idx = self.layer.outlier_idx.to(torch.long)
        xk = x.index_select(-1, idx).to(self.delta.dtype)  # [B, T, k]
        b, t, k = xk.shape
        if b == 1:
            return (xk[0] @ self.delta[int(slots[0])]).unsqueeze(0).to(x.dtype)
        table = self.delta.view(-1, self.delta.shape[-1])  # [(S+1)*k, out]
        onehot = xk.new_zeros(b, t, self.delta.shape[0], k)
        onehot[torch.arange(b), :, slots] = xk
        return (onehot.view(b * t, -1) @ table).view(b, t, -1).to(x.dtype)


def projections(module: nn.Module) -> list[SlotProjection]:
    return [m for m in module.modules() if isinstance(m, SlotProjection)]
