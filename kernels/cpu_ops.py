"""CPU path of `OWQLinear`: the dense part from a prepared plan, the per-row-slot weak columns.

A `CpuPlan` is what a layer keeps on the CPU for one compute dtype: the dequantized dense weight
(weak rows hold zero for a stored layer) and, where it applies, the codes repacked for torch's
4-bit weight-only kernel. The dense part takes one of two kernels by step:

- decode steps (one token per row) of up to `INT4_MAX_ROWS` rows: the 2/3-bit codes repacked,
  centred, as 4-bit (`torch._weight_int4pack_mm_for_cpu`, bf16 activations and per-channel
  scales): half a byte per weight instead of four. Only for one-group layers (`group_size = -1`)
  of at most 3 bits, input width a multiple of 32, output a multiple of 16. Its exact twin is
  `int4_twin` (bf16(x) @ ((q - z)·bf16(s)), fp32 accumulation, one bf16 rounding).
- prefill (always, also a one-token prompt), larger decode batches, grouped or 4-bit layers and
  other compute dtypes: the dense weight and one GEMM (twin: `reference.owq_matmul`).

The kernel depends on the step's kind and size, never on which other requests share it, so a
request's tokens do not depend on its batch while the batch stays within `INT4_MAX_ROWS` rows.
Knows the packed layout; nothing about models, requests or adapters by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packing import unpack_codes, unpack_zeros
from .types import PackedWeight, WeakColumns

log = logging.getLogger(__name__)

INT4_MAX_ROWS = 16
INT4_OP = "_weight_int4pack_mm_for_cpu"
INT4_GROUPS = (256, 128, 64, 32)  # group sizes the 4-bit kernel takes; the largest that fits


@dataclass(frozen=True)
class Int4Weight:
    """Operands of torch's 4-bit CPU kernel: centred codes q - z + 8 and bf16 (scale, 0) pairs."""

    packed: torch.Tensor  # the kernel's own layout
    group: int  # the kernel's group size (every group carries the same per-channel scale)
    scale_zero: torch.Tensor  # bf16 [in / group, out, 2]


@dataclass(frozen=True)
class CpuPlan:
    dtype: torch.dtype
    weight: torch.Tensor  # [out, in] dense part in `dtype`
    int4: Int4Weight | None = None


def channel_codes(packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(codes int32 [out, in] in [0, 2^bits), zeros int32 [out], scale fp32 [out]) with
    dense = (codes - zeros[:, None]) * scale[:, None], for one-group (per-channel) layers;
    None for grouped layers."""
    if packed.group_size != -1:
        return None
    codes = unpack_codes(packed.qweight, packed.bits).t().to(torch.int32).contiguous()
    zeros = unpack_zeros(packed.qzeros, packed.bits, packed.out_features)[0].to(torch.int32)
    return codes, zeros, packed.scales[0].float()


def int4_qualifies(packed: PackedWeight) -> int:
    """The 4-bit kernel's group size for this layer, 0 where it does not qualify: one group
    (per-channel scales), at most 3 bits, input a multiple of 32, output of 16."""
    group = next((g for g in INT4_GROUPS if packed.in_features % g == 0), 0)
    if packed.group_size != -1 or packed.out_features % 16 or packed.bits > 3:
        return 0
    return group if hasattr(torch, INT4_OP) else 0


def int4_weight(codes: torch.Tensor, zeros: torch.Tensor, scale: torch.Tensor, group: int):
    """The 4-bit kernel's operands from per-channel (codes [out, in], zeros [out], scale [out]),
    or None where this torch build refuses the layout.

    The kernel computes (q − 8)·scale + zero. Codes are stored centred, q − z + 8 (in [1, 15] for
    3 bits), so its zero term is exactly 0 and the only rounding is the bf16 scale: a zero point
    folded into a bf16 `zero` instead errs by up to 2^-9·8·scale on every weight of a row alike,
    a bias that cost 0.6% perplexity. 4-bit codes centred would need 5 bits, so 4-bit layers keep
    the dense path."""
    pair = torch.stack([scale, torch.zeros_like(scale)], -1).to(torch.bfloat16)  # [out, 2]
    try:
        kernel_layout = torch._convert_weight_to_int4pack_for_cpu(codes - zeros[:, None] + 8, 1)
    except RuntimeError as e:  # a layout this torch build refuses: the dense path serves it
        log.warning("4-bit decode kernel unavailable for out=%d: %s", codes.shape[0], e)
        return None
    groups = codes.shape[1] // group
    return Int4Weight(kernel_layout, group, pair.expand(groups, -1, -1).contiguous())


def plan(packed: PackedWeight, dtype: torch.dtype, int4: bool = False) -> CpuPlan:
    """The dense weight [out, in] in `dtype`, plus the 4-bit operands when `int4` and the layer
    qualifies (only for a float32 compute dtype); the codes are unpacked once for both."""
    group = int4_qualifies(packed) if int4 and dtype == torch.float32 else 0
    if not group:
        return CpuPlan(dtype, packed.dequantize(dtype).t().contiguous())
    codes, zeros, scale = channel_codes(packed)
    weight = ((codes - zeros[:, None]).float() * scale[:, None]).to(dtype)
    return CpuPlan(dtype, weight, int4_weight(codes, zeros, scale, group))


def int4_twin(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """Exact emulation of the 4-bit kernel: x [M, in] -> [M, out] in x's dtype."""
    codes, zeros, scale = channel_codes(packed)
    w = (codes - zeros[:, None]).float() * scale.bfloat16().float()[:, None]  # [out, in]
    return (x.bfloat16().float() @ w.t()).bfloat16().to(x.dtype)


def dense(x: torch.Tensor, p: CpuPlan, decode: bool = False) -> torch.Tensor:
    """x: [B, T, in] (or [M, in]) -> dense part [..., out]; the 4-bit kernel on decode steps."""
    one_token = x.dim() == 3 and x.shape[1] == 1 and x.shape[0] <= INT4_MAX_ROWS
    if not decode or p.int4 is None or not one_token:
        return F.linear(x, p.weight)
    b, _, n = x.shape
    q = p.int4
    y = torch._weight_int4pack_mm_for_cpu(
        x.reshape(b, n).to(torch.bfloat16), q.packed, q.group, q.scale_zero
    )
    return y.to(x.dtype).view(b, 1, -1)


def weak_product(x: torch.Tensor, weak: WeakColumns, slots: torch.Tensor | None) -> torch.Tensor:
    """x[..., idx] @ table[slot(row)] for x [B, T, in], slots long [B] or None (slot 0).

    Rows of many slots run as one GEMM against the whole table seen as [(S+1)·k, out], each row's
    gathered inputs placed at its own slot's k rows (zeros elsewhere). Twin:
    `reference.weak_columns_product`."""
    table = weak.table if weak.table.dtype == x.dtype else weak.table.to(x.dtype)
    xk = x.index_select(-1, weak.idx.to(torch.long))  # [B, T, k]
    if slots is None:
        return xk @ table[0]
    b, t, k = xk.shape
    if b == 1:
        return (xk[0] @ table[int(slots[0])]).unsqueeze(0)
    onehot = xk.new_zeros(b, t, table.shape[0], k)
    onehot[torch.arange(b), :, slots] = xk
    return (onehot.view(b * t, -1) @ table.view(-1, table.shape[-1])).view(b, t, -1)


def linear(
    x: torch.Tensor,
    p: CpuPlan,
    weak: WeakColumns,
    bias: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
    decode: bool = False,
) -> torch.Tensor:
    """The CPU layer op: x [B, ..., in], slots [B] or None -> [B, ..., out] in x's dtype."""
    y = dense(x, p, decode)
    if bias is not None:
        y = y + bias.to(x.dtype)
    if weak.k == 0:
        return y
    rows = 1 if slots is None else x.shape[0]
    weak_part = weak_product(x.reshape(rows, -1, x.shape[-1]), weak, slots)
    return y + weak_part.view(y.shape)
