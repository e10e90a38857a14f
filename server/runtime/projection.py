"""`SlotProjection`: one or more `OWQLinear`s that read the same input, called as `proj(x, slots)`.

On the CPU the layers' dense parts are concatenated along the output (q/k/v, gate/up) and the
weak part of every row is one product with a block-diagonal fp32 table `[S+1, K, OUT]` of weak
columns (row 0 = the base's `oweight`, row s = adapter slot s, kept in sync with the layers' slot
tables: `refresh` after each slot write). The dense part takes one of two kernels by step:

- decode steps (one token per row) of up to `PACKED_MAX_ROWS` rows: the 2/3-bit codes repacked,
  centred, as 4-bit (`torch._weight_int4pack_mm_for_cpu`, bf16 activations and per-channel
  scales): half a byte per weight instead of four.
  Measured here on the default model's linears at one row: 4.7 ms against 11.5 ms for int8
  codes and ~20 ms for the fp32 GEMV; 30 vs 43 ms (fp32) at 16 rows. The cost is bf16 rounding
  of activations and scales (relative ~3e-3 on a projection's output; benchmarks/cpu_decode.py:
  Persuasion perplexity scored through decode steps moves by under 0.1%). Only for one-group layers
  (`group_size = -1`) of at most 3 bits, input width a multiple of 32, output a multiple of 16.
- prefill (always, also a one-token prompt, so prompt scoring equals the offline model), larger
  decode batches, grouped layers and other compute dtypes: the dequantized weight in the compute
  dtype and one GEMM.

The kernel depends on the step's kind (`StepIndex.decode`) and size, never on which other requests
share it, so a request's tokens do not depend on its batch while the running batch stays within
`PACKED_MAX_ROWS` rows.

The layers' own dense caches are dropped. Off the CPU each layer's own kernels take `slots`
directly and the outputs are concatenated. Knows nothing about models or requests.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from owq.kernels import OWQLinear

log = logging.getLogger(__name__)

PACKED_MAX_ROWS = 16
PACKED_OP = "_weight_int4pack_mm_for_cpu"
PACK_GROUPS = (256, 128, 64, 32)  # group sizes the 4-bit kernel takes; the largest that fits


class SlotProjection(nn.Module):
    def __init__(self, *layers: OWQLinear):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.sizes = [layer.out_features for layer in layers]
        self.weight: torch.Tensor | None = None  # [OUT, in], compute dtype (CPU only)
        self.packed: torch.Tensor | None = None  # 4-bit kernel layout (packed path only)
        self.pack_group = 0
        self.scale_zero: torch.Tensor | None = None  # bf16 [in / group, OUT, 2]
        self.bias: torch.Tensor | None = None
        self.idx: torch.Tensor | None = None  # long [K]: every layer's weak inputs, in order
        self.table: torch.Tensor | None = None  # fp32 [S+1, K, OUT], block-diagonal
        self.want_packed = True  # the last `prepare`'s choice (a lazy re-prepare keeps it)

    @property
    def on_cpu(self) -> bool:
        return not self.layers[0].qweight.is_cuda

    def prepare(self, dtype: torch.dtype, packed: bool = True) -> None:
        """Build the fused weights in `dtype` (and the 4-bit packed form when `packed` and it
        applies) plus the weak-column table; CPU only, a no-op elsewhere."""
        self.want_packed = packed
        if not self.on_cpu:
            return
        layers = self.layers
        with torch.inference_mode(False), torch.no_grad():  # tables stay writable by refresh
            self.weight = torch.cat([layer.dense_weight(dtype, cache=False) for layer in layers])
            self.packed = self.scale_zero = None
            if packed and dtype == torch.float32:
                self._pack()
            self.bias = None
            if any(layer.bias is not None for layer in layers):
                self.bias = torch.cat([
                    layer.bias.to(dtype) if layer.bias is not None else torch.zeros(n, dtype=dtype)
                    for layer, n in zip(layers, self.sizes, strict=True)
                ])  # fmt: skip
            for layer in layers:
                layer.invalidate_cache()
            self.sync()

    def _pack(self) -> None:
        """The 4-bit kernel's operands, if every layer has per-channel codes of at most 3 bits.

        The kernel computes (q − 8)·scale + zero. Codes are stored centred, q − z + 8 (in [1, 15]
        for 3 bits), so its zero term is exactly 0 and the only rounding is the bf16 scale: a
        zero point folded into a bf16 `zero` instead errs by up to 2^-9·8·scale on every weight
        of a row alike, a bias that cost 0.6% perplexity here. 4-bit codes centred would need
        5 bits, so 4-bit layers keep the fp32 path."""
        layers = self.layers
        in_features = layers[0].in_features
        group = next((g for g in PACK_GROUPS if in_features % g == 0), 0)
        if (
            not group
            or sum(self.sizes) % 16  # the kernel's layout packs 16 output channels at a time
            or max(layer.bits for layer in layers) > 3
            or not hasattr(torch, PACKED_OP)
        ):
            return
        found = [layer.channel_codes() for layer in layers]
        if any(f is None for f in found):
            return
        codes = torch.cat([c - z[:, None] + 8 for c, z, _ in found])  # [OUT, in], in [1, 15]
        scale = torch.cat([f[2] for f in found])
        pair = torch.stack([scale, torch.zeros_like(scale)], -1).to(torch.bfloat16)  # [OUT, 2]
        try:
            self.packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        except RuntimeError as e:  # a layout this torch build refuses: the fp32 path serves it
            log.warning("4-bit decode kernel unavailable for %s: %s", self.sizes, e)
            return
        self.scale_zero = pair.expand(in_features // group, -1, -1).contiguous()
        self.pack_group = group

    def sync(self) -> None:
        """Rebuild the whole weak-column table from the layers."""
        layers = self.layers
        weak = sum(layer.num_weak for layer in layers)
        if not weak or not self.on_cpu:
            self.idx = self.table = None
            return
        self.idx = torch.cat([layer.outlier_idx.to(torch.long) for layer in layers])
        slots = layers[0].num_slots
        with torch.inference_mode(False):  # a normal tensor: refresh writes it in any mode
            self.table = torch.zeros(slots + 1, weak, sum(self.sizes))
        for slot in range(slots + 1):
            self.refresh(slot)

    def refresh(self, slot: int) -> None:
        """After `layer.set_slot(slot, ...)` on every layer: copy that slot's columns."""
        if self.table is None or self.table.shape[0] != self.layers[0].num_slots + 1:
            if self.weight is not None:
                self.sync()
            return
        row = col = 0
        with torch.no_grad():
            for layer, n in zip(self.layers, self.sizes, strict=True):
                k = layer.num_weak
                if k:
                    cols = layer.oweight if slot == 0 else layer.adapter_table[slot - 1]
                    self.table[slot, row : row + k, col : col + n] = cols.float()
                row, col = row + k, col + n

    def forward(
        self, x: torch.Tensor, slots: torch.Tensor | None = None, decode: bool = False
    ) -> torch.Tensor:
        # x: [B, T, in]; slots: long [B] or None (every row on slot 0); decode: a decode step
        if not self.on_cpu:
            outs = [layer(x, slots) for layer in self.layers]
            return outs[0] if len(outs) == 1 else torch.cat(outs, -1)
        if self.weight is None or self.weight.dtype != x.dtype:
            self.prepare(x.dtype, self.want_packed)
        y = self._dense(x, decode)
        if self.bias is not None:
            y = y + self.bias
        if self.table is None:
            return y
        return y + self._weak(x, slots)

    def _dense(self, x: torch.Tensor, decode: bool) -> torch.Tensor:
        b, t, n = x.shape
        if not decode or self.packed is None or t != 1 or b > PACKED_MAX_ROWS:
            return F.linear(x, self.weight)
        flat = x.reshape(b, n).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.pack_group, self.scale_zero)
        return y.to(x.dtype).view(b, 1, -1)

    def _weak(self, x: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
        xk = x.index_select(-1, self.idx).to(self.table.dtype)  # [B, T, K]
        b, t, k = xk.shape
        if slots is None:
            return (xk @ self.table[0]).to(x.dtype)
        if b == 1:
            return (xk[0] @ self.table[int(slots[0])]).unsqueeze(0).to(x.dtype)
        flat = self.table.view(-1, self.table.shape[-1])  # [(S+1)*K, OUT]
        onehot = xk.new_zeros(b, t, self.table.shape[0], k)
        onehot[torch.arange(b), :, slots] = xk
        return (onehot.view(b * t, -1) @ flat).view(b, t, -1).to(x.dtype)


def projections(module: nn.Module) -> list[SlotProjection]:
    return [m for m in module.modules() if isinstance(m, SlotProjection)]


def prepare_projections(module: nn.Module, dtype: torch.dtype, packed: bool = True) -> None:
    for proj in projections(module):
        proj.prepare(dtype, packed)
