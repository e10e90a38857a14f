"""CPU path of `OWQLinear`: the dense part from a prepared plan, the per-row-slot weak columns.

A `CpuPlan` is what a layer keeps on the CPU for one compute dtype: its codes in the layout of
one low-bit kernel (half a byte per weight) and, only when asked for (`resident=True`), a
dequantized dense copy. The dense part takes one of these kernels, by what the step may do
(`fast`, the runtime's choice: every decode step, and every prefill that does not score its
prompt's tokens):

- fast, on x86 CPUs with AVX2: the 16-bit GEMM (`cpu_gemm16`: activations rounded to int16 per
  row, exact integer sums, fp32 scales and zero points; AMX, AVX-512 VNNI or AVX2 forms, the
  same bits) for every layer it takes, of 2, 3 or 4 bits, the head included. Exact twin:
  `cpu_gemm16.twin`.
- fast, elsewhere: torch's 4-bit kernel (`torch._weight_int4pack_mm_for_cpu`, bf16 activations
  and scales, fp32 accumulation) for every layer of at most 4 bits whose input width is a
  multiple of 32 and output a multiple of 16. The kernel computes (q − 8)·s + zero per group.
  2/3-bit codes are stored centred, q − z + 8, so its zero term is exactly 0 (a zero point
  folded into its bf16 `zero` errs by up to 2^-9·8·s on every weight of a row alike: a bias
  that cost 0.6% perplexity); 4-bit codes need all 16 values, so they stay as they are and the
  zero term is added in fp32 afterwards: y += Σ_g (Σ_{j∈g} x_j)·(8 − z_g)·s_g. Exact twin:
  `int4_twin`. `fast_twin` is the twin of whichever kernel a plan holds.
- exact (prompt scoring, or layers no low-bit kernel takes): one fp32 GEMM on the
  dequantized weight, the resident copy if the plan keeps one, else a transient one made for
  this call; the same numbers as `owq eval` (twin: `reference.owq_matmul`).

The weak part (x[..., idx] times each row's slot of the table, fp16 as stored): rows on the base
take the fp32 GEMM on slot 0 (`add_base_columns`); on packed fast steps, rows on adapters take one
`embedding_bag` that sums each row's own slot rows alone in fp16 (`weak_bag`: 16 rows on 16
adapters read only their own columns, at half the bytes), and on exact steps fp32 GEMMs over
the used slots (`weak_product`). On packed steps a row's numbers do not depend on what else
shares the step.

A row's result depends on the step's kind, never on the step's size or on which other requests
share it. Knows the packed layout; nothing about models, requests or adapters by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import cpu_build, cpu_gemm16
from .cpu_gemm16 import Int16Weight
from .packing import column_chunks, unpack_codes, unpack_zeros
from .types import PackedWeight, WeakColumns

log = logging.getLogger(__name__)
# rows per GEMM of a row-invariant product (`add_base_columns`): a fixed shape, any M
ROW_BLOCK = 8

INT4_OP = "_weight_int4pack_mm_for_cpu"
INT4_GROUPS = (256, 128, 64, 32)  # group sizes the 4-bit kernel takes


@dataclass(frozen=True)
class Int4Weight:
    """Operands of torch's 4-bit CPU kernel, plus the fp32 zero term of 4-bit codes."""

    packed: torch.Tensor  # the kernel's own layout
    group: int  # the kernel's group size
    scale_zero: torch.Tensor  # bf16 [in / group, out, 2]: (scale, 0) per kernel group
    correction: torch.Tensor | None  # fp32 [groups, out]: (8 − z)·bf16(s); None for centred codes
    group_size: int  # the layer's own group size along the input (in for one group)


@dataclass(frozen=True)
class CpuPlan:
    dtype: torch.dtype
    weight: torch.Tensor | None  # [out, in] resident dense copy in `dtype`, or None
    int4: Int4Weight | None = None  # torch's 4-bit kernel, or
    int16: Int16Weight | None = None  # the 16-bit GEMM (at most one of the two)
    idx: torch.Tensor | None = None  # long [k]: the weak-column indices, converted once
    _slot0: list = field(default_factory=lambda: [None, None, -1], repr=False, compare=False)

    @property
    def kernel(self) -> str | None:
        """The low-bit kernel of fast steps: "int16", "int4", or None (the dense path)."""
        return "int16" if self.int16 is not None else "int4" if self.int4 is not None else None

    def table0(self, weak: WeakColumns) -> torch.Tensor:
        """Slot 0 of the table (the base's weak columns) [k, out] in `dtype`: converted once,
        and again only after the table was written (an offline merge writes slot 0 in place,
        a load writes other slots; both bump the tensor's version counter)."""
        table = weak.table
        if table.dtype == self.dtype:
            return table[0]
        try:
            version = table._version
        except RuntimeError:  # an inference tensor keeps no version: convert every call
            return table[0].to(self.dtype)
        converted, seen, seen_version = self._slot0
        if seen is not table or seen_version != version:
            converted = table[0].to(self.dtype)
            self._slot0[:] = [converted, table, version]
        return converted


def layer_codes(packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int32 [out, in] in [0, 2^bits), zeros int32 [out, in], scale fp32 [out, in]) per
    element (its group's zero point and scale): dense = (codes − zeros)·scale."""
    g = packed.group_index()
    codes = unpack_codes(packed.qweight, packed.bits).t().to(torch.int32).contiguous()
    zeros = unpack_zeros(packed.qzeros, packed.bits, packed.out_features).to(torch.int32)
    return codes, zeros[g].t(), packed.scales.float()[g].t()


def int4_group(packed: PackedWeight) -> int:
    """The 4-bit kernel's group size for this layer, 0 where it does not qualify."""
    if packed.bits > 4 or packed.out_features % 16 or not hasattr(torch, INT4_OP):
        return 0
    fits = [g for g in INT4_GROUPS if packed.in_features % g == 0]
    if packed.group_size != -1:  # kernel groups must not straddle the layer's groups
        fits = [g for g in fits if packed.group_size % g == 0]
    return fits[0] if fits else 0


def int4_codes(packed: PackedWeight, zeros: torch.Tensor, centred: bool) -> torch.Tensor:
    """int32 [out, in]: the codes as the 4-bit kernel stores them, q − z + 8 when `centred`
    (2/3 bits: in [1, 15]), q as it is otherwise (4 bits: [0, 15]); unpacked a chunk of output
    rows at a time (`column_chunks`), so the head's int64 temporaries stay small."""
    g = packed.group_index()
    stored = torch.empty(packed.out_features, packed.in_features, dtype=torch.int32)
    for rows in column_chunks(packed.out_features):
        codes = unpack_codes(packed.qweight[:, rows], packed.bits)  # int64 [in, rows]
        if centred:
            codes = codes - zeros[:, rows][g] + 8
        stored[rows] = codes.t()
    return stored


def int4_weight(packed: PackedWeight, group: int) -> Int4Weight | None:
    """The 4-bit kernel's operands (codes unpacked once), or None where this torch build refuses
    the layout."""
    zeros = unpack_zeros(packed.qzeros, packed.bits, packed.out_features)  # [groups, out]
    centred = packed.bits <= 3
    stored = int4_codes(packed, zeros, centred)
    per = packed.in_features if packed.group_size == -1 else packed.group_size
    scale_g = packed.scales.to(torch.bfloat16)  # [groups, out]
    kernel_scale = scale_g.repeat_interleave(per // group, 0)  # [in / group, out]
    pair = torch.stack([kernel_scale, torch.zeros_like(kernel_scale)], -1)
    correction = None
    if not centred:
        correction = (8 - zeros).float() * scale_g.float()
    try:
        layout = torch._convert_weight_to_int4pack_for_cpu(stored, 1)
    except RuntimeError as e:  # a layout this torch build refuses: the dense path serves it
        log.warning("4-bit decode kernel unavailable for out=%d: %s", packed.out_features, e)
        return None
    return Int4Weight(layout, group, pair.contiguous(), correction, per)


def plan(
    packed: PackedWeight,
    dtype: torch.dtype,
    int4: bool = False,
    resident: bool = True,
    idx: torch.Tensor | None = None,
) -> CpuPlan:
    """The layer's CPU plan: a low-bit kernel for fast steps when `int4` (float32 compute only;
    the 16-bit GEMM where the layer fits it and `cpu_build.gemm16()` runs on this CPU, else
    torch's 4-bit kernel where the layer qualifies), a resident dense copy [out, in] when
    `resident` or when there is no low-bit kernel (decode would otherwise dequantize every
    step), the weak indices `idx` as long."""
    q4 = q16 = None
    if int4 and dtype == torch.float32:
        if cpu_gemm16.takes(packed) and cpu_build.gemm16() is not None:
            q16 = cpu_gemm16.weight(packed)
        elif group := int4_group(packed):
            q4 = int4_weight(packed, group)
    keep = resident or (q4 is None and q16 is None)
    weight = packed.dequantize(dtype).t().contiguous() if keep else None
    return CpuPlan(dtype, weight, q4, q16, None if idx is None else idx.to(torch.long))


def int4_twin(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """Exact emulation of the 4-bit path: x [M, in] -> [M, out] in x's dtype: bf16(x) @
    ((q − z)·bf16(s)) accumulated in fp32 (the kernel rounds its part to bf16 once)."""
    codes, zeros, scale = layer_codes(packed)
    xb = x.bfloat16().float()
    s = scale.bfloat16().float()
    if packed.bits <= 3:
        return (xb @ ((codes - zeros).float() * s).t()).bfloat16().to(x.dtype)
    main = (xb @ ((codes - 8).float() * s).t()).bfloat16().float()
    return (main + xb @ ((8 - zeros).float() * s).t()).to(x.dtype)


def fast_twin(x: torch.Tensor, p: CpuPlan, packed: PackedWeight) -> torch.Tensor:
    """Exact emulation of the dense part of a fast step on plan `p`'s kernel: x [M, in]."""
    if p.int16 is not None:
        return cpu_gemm16.twin(x, packed).to(x.dtype)
    return int4_twin(x, packed)


def _int4(x: torch.Tensor, q: Int4Weight) -> torch.Tensor:
    # x: [M, in] -> [M, out]
    xb = x.to(torch.bfloat16)
    y = torch._weight_int4pack_mm_for_cpu(xb, q.packed, q.group, q.scale_zero).float()
    if q.correction is not None:  # the zero term of codes stored as they are, in fp32
        sums = xb.float().view(x.shape[0], -1, q.group_size).sum(-1)  # [M, groups]
        y = torch.addmm(y, sums, q.correction)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def dense(x: torch.Tensor, p: CpuPlan, packed: PackedWeight, fast: bool = False) -> torch.Tensor:
    """x: [B, T, in] (or [M, in]) -> dense part [..., out]; the plan's kernel on fast steps."""
    if fast and p.int16 is not None:
        y = cpu_gemm16.mm(x.reshape(-1, x.shape[-1]), p.int16)
        return y.view(*x.shape[:-1], -1).to(x.dtype)
    if fast and p.int4 is not None:
        return _int4(x.reshape(-1, x.shape[-1]), p.int4).view(*x.shape[:-1], -1)
    weight = p.weight  # transient when not resident: the same [out, in] layout, the same bits
    return F.linear(x, packed.dequantize(x.dtype).t().contiguous() if weight is None else weight)


def weak_bag(
    x: torch.Tensor, weak: WeakColumns, slots: torch.Tensor, bags: tuple | None = None
) -> torch.Tensor:
    """The weak part of rows on adapters in packed steps: x[..., idx] @ table[slot(row)] for
    x [B, T, in], slots long [B] -> [B, T, out] in the table's dtype (fp16, as adapters are
    stored: half the bytes of fp32; the inputs are rounded to it, sums run in fp32).

    One `embedding_bag` over the slot table seen as [(S+1)·k, out]: each token is a bag of its
    slot's k rows weighted by its k gathered inputs. It reads only the rows of the slots the
    batch uses and does no work for other slots (the one-hot GEMM of `weak_product` does U
    times the work, which 16 rows on 16 adapters paid), and each bag is summed alone, so a
    row's result does not depend on the other rows of the step. `bags`: `bags_of(slots, T, k)`
    when the caller has it. Twin: `reference.weak_columns_product` on the same inputs."""
    b, t, _ = x.shape
    table = weak.table
    k, out = table.shape[1], table.shape[2]
    xk = x.index_select(-1, weak.idx.to(torch.long)).reshape(-1).to(table.dtype)
    rows, offsets = bags if bags is not None else bags_of(slots, t, k)
    y = torch.embedding_bag(table.view(-1, out), rows, offsets, False, 0, False, xk)[0]
    return y.view(b, t, out)


def bags_of(slots: torch.Tensor, t: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(table rows [B·T·k], bag offsets [B·T]) of rows on `slots` with T tokens each and k weak
    inputs: the `embedding_bag` operands of `weak_bag`."""
    first = slots.to(torch.long) * k  # each row's first table row
    if t > 1:
        first = first.repeat_interleave(t)
    rows = (first[:, None] + torch.arange(k, device=slots.device)).view(-1)
    return rows, torch.arange(0, rows.numel(), k, device=slots.device)


class _StepRows:
    """What every layer of one packed step needs to know about its slots, made once: every
    layer of a step gets the same slots tensor, so the last one seen is remembered (by
    identity) with its split into rows on the base and rows on adapters and their bags."""

    last: tuple[torch.Tensor | None, _StepRows | None] = (None, None)

    def __init__(self, slots: torch.Tensor):
        on = slots != 0
        adapters = on.nonzero().view(-1)
        self.base = self.adapters = None  # row indices; None: all or none of the rows
        self.slots = slots  # the adapter rows' slots (all rows' when every row is on one)
        if adapters.numel() == 0:
            self.slots = None
        elif adapters.numel() < slots.numel():
            self.base, self.adapters = (~on).nonzero().view(-1), adapters
            self.slots = slots.index_select(0, adapters)
        self._bags: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def of(cls, slots: torch.Tensor) -> _StepRows:
        seen, rows = cls.last
        if seen is not slots or rows is None:
            rows = cls(slots)
            cls.last = (slots, rows)
        return rows

    def bags(self, t: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (t, k) not in self._bags:
            self._bags[t, k] = bags_of(self.slots, t, k)
        return self._bags[t, k]


def add_base_columns(
    y: torch.Tensor, x: torch.Tensor, weak: WeakColumns, table0: torch.Tensor, row_invariant: bool
) -> None:
    """y [M, out] += x[:, idx] [M, k] @ slot 0 (`table0`, in x's dtype): one gather, one GEMM
    (not `addmm_`, whose sums into y round otherwise on some CPUs).

    `row_invariant` (packed steps): a row's bits the same at any M, beside any rows. MKL's GEMM
    sums a row in an order that depends on M: on an AVX2 EPYC, 7 of the M in 2..16 give the
    rows of M = 16 (on an AVX-512 Xeon, all M >= 2; M = 1 takes a GEMV there, which turned a
    seeded request's tokens beside others). At a fixed M it does not depend on the row's place
    or its neighbours, so such rows run as a batch of GEMMs of ROW_BLOCK rows each (the last
    zero-padded). Measured on both CPUs; the packed-step tests pin it."""
    idx = weak.idx if weak.idx.dtype == torch.long else weak.idx.long()
    xk = x.index_select(1, idx)
    if not row_invariant:  # as `weak_product` on one slot: rows on slot 0 equal no slots
        y.add_(xk @ table0)
        return
    m = xk.shape[0]
    if m % ROW_BLOCK:
        xk = torch.cat([xk, xk.new_zeros(-m % ROW_BLOCK, xk.shape[1])])
    blocks = xk.view(-1, ROW_BLOCK, xk.shape[1])
    product = torch.bmm(blocks, table0.expand(blocks.shape[0], -1, -1))
    y.add_(product.view(-1, table0.shape[1])[:m])


def weak_product(x: torch.Tensor, weak: WeakColumns, slots: torch.Tensor) -> torch.Tensor:
    """The weak part of exact steps: x[..., idx] @ table[slot(row)] for x [B, T, in], slots
    long [B] (`linear` runs the slot-0-only case itself, in place), in x's dtype.

    Only the slots the batch uses are read (a step on one adapter costs what a step on the base
    does; a copy of a few slots' tables costs less than reading all, a copy of most costs more):
    rows of several slots run as one GEMM against those slots' tables seen as [U·k, out],
    each row's gathered inputs placed at its own slot's k rows (zeros elsewhere). Twin:
    `reference.weak_columns_product`."""
    table = weak.table  # converted to x's dtype only where read (a no-op when it matches)
    xk = x.index_select(-1, weak.idx.to(torch.long))  # [B, T, k]
    used, where = torch.unique(slots, return_inverse=True)
    if used.numel() == 1:
        return xk @ table[int(used[0])].to(x.dtype)
    if 2 * used.numel() > table.shape[0]:  # most slots: reading them all beats copying most
        used, where = torch.arange(table.shape[0]), slots
    else:
        table = table.index_select(0, used)  # [U, k, out]
    table = table.to(x.dtype)
    b, t, k = xk.shape
    onehot = xk.new_zeros(b, t, used.numel(), k)
    onehot[torch.arange(b), :, where] = xk
    return (onehot.view(b * t, -1) @ table.view(-1, table.shape[-1])).view(b, t, -1)


def _add_packed(
    y: torch.Tensor, x: torch.Tensor, weak: WeakColumns, p: CpuPlan, step: _StepRows
) -> torch.Tensor:
    """The weak part of a packed step with rows on adapters, added into y [B, T, out] in place:
    those rows through the fp16 bag, rows on the base (if any) through the fp32 GEMM, so that a
    row gets the same numbers whatever else shares its step."""
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    b, t, _ = rows.shape
    bags = step.bags(t, weak.table.shape[1])
    if step.base is None:
        return y.add_(weak_bag(rows, weak, step.slots, bags).view(y.shape))
    out = y.view(b, t, -1)
    part = weak_bag(rows.index_select(0, step.adapters), weak, step.slots, bags)
    out.index_add_(0, step.adapters, part.to(y.dtype))
    on_base = rows.index_select(0, step.base).reshape(-1, rows.shape[-1])
    base = out.new_zeros(on_base.shape[0], out.shape[-1])
    add_base_columns(base, on_base, weak, p.table0(weak), row_invariant=True)
    out.index_add_(0, step.base, base.view(-1, t, out.shape[-1]))
    return y


def linear(
    x: torch.Tensor,
    p: CpuPlan,
    packed: PackedWeight,
    weak: WeakColumns,
    bias: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
    fast: bool = False,
) -> torch.Tensor:
    """The CPU layer op: x [B, ..., in], slots [B] or None -> [B, ..., out] in x's dtype."""
    y = dense(x, p, packed, fast)  # a fresh tensor: the rest adds into it in place
    if bias is not None:
        y.add_(bias.to(x.dtype))
    if weak.k == 0:
        return y
    if p.idx is not None:
        weak = WeakColumns(p.idx, weak.table)
    packed = fast and p.kernel is not None
    if packed and slots is not None:  # rows on adapters: each its own fp16 bag
        step = _StepRows.of(slots)
        if step.slots is not None:
            return _add_packed(y, x, weak, p, step)
        slots = None  # every row on the base
    if slots is None:  # every row on the base's columns
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        add_base_columns(y2, x2, weak, p.table0(weak), row_invariant=packed)
        return y
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    return y.add_(weak_product(rows, weak, slots).view(y.shape))
