"""Launch planning and launches of the CUDA kernels: row templates, split-K plan, grids, arguments.

Every function takes arguments `cuda_ops` has already checked, and the `Backend` to run on.
Grids stay within the device's y/z limits (65,535 on every CUDA GPU): a longer launch is cut
into several, queued in order on the same stream (rows for the GEMV and the SGMV, 32-input
blocks for dequantize), so any M works. Arguments follow CuPy's rules: pointers as Python ints,
every `int` parameter as `numpy.int32`. The split-K plan depends on the SM count, so results are
bitwise reproducible per device model, not across models. Knows the kernels' parameter lists and
the packed layout's shape rules; nothing of models or serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .cuda_build import Backend, DeviceLimits
from .types import PackedWeight, WeakColumns

DECODE_ROWS = 8  # rows per GEMV row chunk (largest row template)
TILE_COLS, KSLICES, GEMV_BLOCK = 256, 4, (64, 4, 1)
DEQ_THREADS, SG_THREADS, SG_ROWS = 128, 128, 8
STAGING_BYTES = 40 * 1024  # shared memory for the staged x of one GEMV block
i32 = np.int32


@dataclass(frozen=True)
class GemvPlan:
    """One GEMV launch: grid (tiles, nsplit, chunks) of blocks GEMV_BLOCK, `smem` dynamic bytes,
    each split `bps` 32-input blocks long."""

    chunks: int
    tiles: int
    nsplit: int
    bps: int
    smem: int


def rows_per_chunk(m: int, vec: bool) -> int:
    """Row template of the GEMV kernel: 1/2/4/8 (only 1/8 for the scalar 'any' kernels)."""
    if not vec:
        return 1 if m == 1 else DECODE_ROWS
    return min(DECODE_ROWS, 1 << (m - 1).bit_length())


def gemv_plan(m: int, mt: int, in_f: int, out: int, kernel_regs: int, limits: DeviceLimits):
    """Split-K plan of `m` rows: enough blocks to fill the SMs, x of a split fitting the staging
    buffer, at most `max_grid_y` splits."""
    chunks, tiles, nblk = -(-m // mt), -(-out // TILE_COLS), in_f // 32
    threads = GEMV_BLOCK[0] * GEMV_BLOCK[1]
    per_sm = max(1, min(8, limits.regs_per_sm // (-(-kernel_regs // 8) * 8 * threads)))
    max_bps = max(1, STAGING_BYTES // (mt * 33 * 4))
    min_bps = -(-nblk // limits.max_grid_y)
    for _ in range(2):  # occupancy depends on smem, smem on the split size
        want = max(1, limits.sms * per_sm // (tiles * chunks))
        bps = max(1, min(max(-(-nblk // want), KSLICES), max_bps, nblk), min_bps)
        smem = 4 * max(mt * bps * 33, (KSLICES - 1) * mt * TILE_COLS)
        per_sm = max(1, min(per_sm, limits.smem_per_sm // (smem + 1024)))
    return GemvPlan(chunks, tiles, -(-nblk // bps), bps, smem)


def launch_ranges(total: int, per_block: int, max_blocks: int) -> list[tuple[int, int]]:
    """[(first, count)] of launches covering `total` items, at most `max_blocks` blocks of
    `per_block` items each."""
    step = per_block * max_blocks
    return [(first, min(step, total - first)) for first in range(0, total, step)]


def aligned(*tensors: torch.Tensor | None, to: int) -> bool:
    return all(t is None or t.data_ptr() % to == 0 for t in tensors)


def _ptr(t: torch.Tensor | None, offset: int = 0) -> int:
    """Data pointer `offset` elements in (0 for None or an empty tensor)."""
    if t is None or t.numel() == 0:
        return 0
    return t.data_ptr() + offset * t.element_size()


def _ints(*values: int) -> tuple:
    return tuple(i32(v) for v in values)


def _weak_ptrs(weak: WeakColumns, slots: torch.Tensor | None) -> tuple[int, int, int, int]:
    """(outlier_idx, slot 0 rows, adapter slots 1..S, S); no slots = every row slot 0."""
    if weak.k == 0:
        return 0, 0, 0, 0
    idx, base = _ptr(weak.idx), _ptr(weak.table)
    if slots is None:
        return idx, base, 0, 0
    return idx, base, _ptr(weak.table[1:]), weak.num_slots


def _tag(vec: bool) -> str:
    return "vec" if vec else "any"


def gemv(x, packed: PackedWeight, weak: WeakColumns, bias, slots, backend: Backend):
    """Fused GEMV of checked x [M, in] (slots int64 [M] or None) -> [M, out] in x's dtype."""
    m, in_f = x.shape
    out, device = packed.out_features, x.device
    vec = out % 4 == 0 and aligned(packed.qweight, to=16)
    vec = vec and aligned(packed.scales, weak.table, bias, to=8)
    mt = rows_per_chunk(m, vec)
    name = f"dequant_gemv_{packed.bits}_{mt}_{_tag(vec)}"
    kernel = backend.function("dequant_gemv.cu", name, x.dtype, device)
    limits = backend.limits(device)
    y = backend.empty((m, out), x.dtype, device)  # [M, out]
    for row0, rows in launch_ranges(m, mt, limits.max_grid_z):
        plan = gemv_plan(rows, mt, in_f, out, getattr(kernel, "num_regs", 128), limits)
        _gemv_launch(kernel, plan, (x, packed, weak, bias, slots, y), row0, rows, backend)
    return y


def _gemv_launch(kernel, plan: GemvPlan, tensors, row0: int, rows: int, backend: Backend):
    x, packed, weak, bias, slots, y = tensors
    in_f, out, device = x.shape[1], y.shape[1], x.device
    partial = None  # [nsplit, rows, out_pad] fp32 split partials
    if plan.nsplit > 1:
        out_pad = -(-out // 4) * 4
        partial = backend.empty((plan.nsplit * rows * out_pad,), torch.float32, device)
    tickets = backend.tickets(device, plan.tiles * plan.chunks)
    idx, base, table, num_slots = _weak_ptrs(weak, slots)
    group_blocks = 0 if packed.group_size == -1 else packed.group_size // 32
    pointers = (_ptr(x, row0 * in_f), _ptr(packed.qweight), _ptr(packed.scales))
    pointers += (_ptr(packed.qzeros), idx, base, table, _ptr(slots, row0), _ptr(bias))
    pointers += (_ptr(y, row0 * out), _ptr(partial), _ptr(tickets))
    sizes = _ints(rows, in_f, out, weak.k, num_slots, group_blocks, plan.bps)
    args = pointers + sizes
    grid = (plan.tiles, plan.nsplit, plan.chunks)
    backend.launch(kernel, grid, GEMV_BLOCK, args, plan.smem, device)
    del partial  # kept alive until the launch is queued


def dequantize(packed: PackedWeight, act: torch.dtype, backend: Backend) -> torch.Tensor:
    """Dense [in, out] in `act` of a checked packed weight (a transient scratch)."""
    in_f, out, device = packed.in_features, packed.out_features, packed.device
    vec = out % 4 == 0 and aligned(packed.qweight, to=16) and aligned(packed.scales, to=8)
    name = f"dequantize_{packed.bits}_{_tag(vec)}"
    kernel = backend.function("dequant_gemv.cu", name, act, device)
    w = backend.empty((in_f, out), act, device)  # [in, out]
    group_blocks = 0 if packed.group_size == -1 else packed.group_size // 32
    limits = backend.limits(device)
    for blk0, blocks in launch_ranges(in_f // 32, 1, limits.max_grid_y):
        pointers = (_ptr(packed.qweight), _ptr(packed.scales), _ptr(packed.qzeros), _ptr(w))
        args = pointers + _ints(out, group_blocks, blk0)
        grid = (-(-out // (DEQ_THREADS * 4)), blocks, 1)
        backend.launch(kernel, grid, (DEQ_THREADS, 1, 1), args, 0, device)
    return w


def sgmv(x, weak: WeakColumns, slots, bias, y, accumulate: bool, backend: Backend):
    """y (+)= x[:, idx] @ table[slot] (+ bias) for checked x [M, in], y [M, out] (x's dtype)."""
    m, in_f = x.shape
    out, device = y.shape[1], x.device
    vec = out % 4 == 0 and aligned(weak.table, bias, y, to=8)
    kernel = backend.function("weak_sgmv.cu", f"weak_columns_sgmv_{_tag(vec)}", x.dtype, device)
    idx, base, table, num_slots = _weak_ptrs(weak, slots)
    for row0, rows in launch_ranges(m, SG_ROWS, backend.limits(device).max_grid_y):
        pointers = (_ptr(x, row0 * in_f), idx, base, table, _ptr(slots, row0), _ptr(bias))
        pointers += (_ptr(y, row0 * out),)
        args = pointers + _ints(rows, in_f, out, weak.k, num_slots, int(accumulate))
        grid = (-(-out // (SG_THREADS * 4)), -(-rows // SG_ROWS), 1)
        backend.launch(kernel, grid, (SG_THREADS, 1, 1), args, 0, device)
    return y
