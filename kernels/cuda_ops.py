"""CuPy RawKernel GPU path of `OWQLinear`: fused dequant-GEMV, batched path, per-row-slot SGMV.

Kernels live in `dequant_gemv.cu` and `weak_sgmv.cu` next to this file; each source is compiled
once per process with `COMPILE_OPTIONS` (the same ones tests/test_cuda_compile.py gives nvcc),
cached by (sha256 of the source, compute capability), and launched on torch's current stream
(`cupy.cuda.ExternalStream`) with tensors handed over by data pointer, no copies. CuPy is
optional (`pip install owq[cuda]`): it is imported lazily and `available()` is False without it
or without a GPU. Every op has a torch twin with the same signature (`reference.owq_matmul`,
`cuda_twins`).

Dispatch in `owq_matmul` for x [M, in]:
- M <= GEMV_ROW_LIMIT: `dequant_gemv`, one launch: fused unpack + dequant + FMA (fp32), weak
  columns with per-row slots and bias in the same launch; M > 8 runs as chunks of 8 rows
  (grid z), each chunk re-reading the packed weight, mostly from L2.
- M > GEMV_ROW_LIMIT: `dequantize_fp16` into a transient fp16 scratch [in, out], cuBLAS
  (`torch.matmul`), then `weak_columns_sgmv` adds the weak columns of every row's own slot and the
  bias in one launch. The dense copy is never kept.
Expected crossover (H100, in=4096, out=11008, 3-bit), to be confirmed with
`benchmarks/kernels.py`: an 8-row chunk of the GEMV is FMA-bound at ~15-20 us; the batched path
costs a fixed ~35 us dequantize (17 MB read, 90 MB written) plus a GEMM that stays memory-bound
(~30 us) up to M of a few hundred, so the chunked GEMV wins up to M ~ 24-32: GEMV_ROW_LIMIT = 32.

Knows the packed layout (`packing`) and nothing about models, checkpoints or serving; it never
caches a dequantized weight.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from .packing import check_layout, num_groups
from .types import PackedWeight, WeakColumns

log = logging.getLogger(__name__)

COMPILE_OPTIONS = ("-std=c++17",)
KERNEL_SOURCES = ("dequant_gemv.cu", "weak_sgmv.cu")
DECODE_ROWS = 8  # rows per GEMV row chunk (largest MT template)
GEMV_ROW_LIMIT = 32  # M above this takes the dequantize + cuBLAS path
TILE_COLS, KSLICES, GEMV_BLOCK = 256, 4, (64, 4, 1)
DEQ_THREADS, SG_THREADS, SG_ROWS = 128, 128, 8
STAGING_BYTES = 40 * 1024  # shared memory for the staged x of one GEMV block
_MIN_TICKETS = 4096


def available() -> bool:
    """True when CuPy imports and torch sees a CUDA device."""
    return _cupy() is not None and torch.cuda.is_available()


@functools.cache
def _cupy():
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library CuPy cannot load
        log.info("CuPy GPU path unavailable: %s", exc)
        return None
    return cupy


# compile cache --------------------------------------------------------------------------------
@functools.cache
def _source(name: str) -> tuple[str, str]:
    text = (Path(__file__).parent / name).read_text()
    return text, hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def _module(name: str, digest: str, arch: tuple[int, int]):
    log.info("compiling %s (sha256 %s) for sm_%d%d", name, digest[:12], *arch)
    return _cupy().RawModule(code=_source(name)[0], options=COMPILE_OPTIONS)


@functools.cache
def _function(name: str, function: str, device: int):
    _, digest = _source(name)
    arch = torch.cuda.get_device_capability(device)
    with _cupy().cuda.Device(device):
        return _module(name, digest, arch).get_function(function)


def _launch(kernel, grid: tuple, block: tuple, args: tuple, smem: int, device: int) -> None:
    cupy = _cupy()
    stream = torch.cuda.current_stream(device).cuda_stream
    with cupy.cuda.Device(device), cupy.cuda.ExternalStream(stream):
        kernel(grid, block, args, shared_mem=smem)


@functools.cache
def _ticket_store() -> dict:
    return {}


def _tickets(device: torch.device, count: int) -> torch.Tensor:
    """Per (device, stream) int32 counters, left at zero by every GEMV launch."""
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    store = _ticket_store()
    tickets = store.get(key)
    if tickets is None or tickets.numel() < count:
        tickets = torch.zeros(max(count, _MIN_TICKETS), dtype=torch.int32, device=device)
        store[key] = tickets
    return tickets


@functools.cache
def _sm_limits(device: int) -> tuple[int, int, int]:
    props = torch.cuda.get_device_properties(device)
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    smem = getattr(props, "shared_memory_per_multiprocessor", 100 * 1024)
    return props.multi_processor_count, regs, smem


# argument checks ------------------------------------------------------------------------------
def _expect(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple, device) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {list(shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor on {device}, got {t.device}")


def _check_packed(qweight, scales, qzeros, in_f: int, bits: int, group_size: int, device) -> int:
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [in*bits/32, out], got {tuple(qweight.shape)}")
    out = qweight.shape[1]
    check_layout(in_f, out, bits, group_size)
    groups = num_groups(in_f, group_size)
    _expect("qweight", qweight, torch.int32, (in_f * bits // 32, out), device)
    _expect("scales", scales, torch.float16, (groups, out), device)
    _expect("qzeros", qzeros, torch.int32, (groups, -(-out // 32) * bits), device)
    return out


def _check_weak(x, outlier_idx, oweight, adapter_table, slots, bias, out: int) -> int:
    m, device = x.shape[0], x.device
    k = outlier_idx.numel()
    _expect("outlier_idx", outlier_idx, torch.int32, (k,), device)
    _expect("oweight", oweight, torch.float16, (k, out), device)
    if bias is not None:
        _expect("bias", bias, torch.float16, (out,), device)
    if adapter_table is not None:
        _expect(
            "adapter_table", adapter_table, torch.float16, (adapter_table.shape[0], k, out), device
        )
    if slots is not None:
        if tuple(slots.shape) != (m,) or slots.is_floating_point() or slots.device != device:
            raise ValueError(
                f"slots must be an integer tensor [{m}] on {device}, got "
                f"{slots.dtype} {tuple(slots.shape)} on {slots.device}"
            )
    return k


def _check_x(x: torch.Tensor) -> None:
    if x.dim() != 2 or not x.is_cuda or x.dtype != torch.float16 or not x.is_contiguous():
        raise ValueError(
            f"x must be a contiguous float16 CUDA tensor [M, in], got {x.dtype} "
            f"{tuple(x.shape)} on {x.device}"
        )


def _slot_args(adapter_table, slots) -> tuple[int, int, int, torch.Tensor | None]:
    """(table ptr, slots ptr, num_slots, slots int64 kept alive); no table = every row slot 0."""
    if slots is None or adapter_table is None or adapter_table.shape[0] == 0:
        return 0, 0, 0, None
    slots64 = slots.to(torch.int64).contiguous()
    return adapter_table.data_ptr(), slots64.data_ptr(), adapter_table.shape[0], slots64


def _aligned(*tensors, to: int) -> bool:
    return all(t is None or t.data_ptr() % to == 0 for t in tensors)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


# fused dequant-GEMV ---------------------------------------------------------------------------
def _rows_per_chunk(m: int, vec: bool) -> int:
    """Row template of the GEMV kernel: 1/2/4/8 (only 1/8 for widths not a multiple of 4)."""
    if not vec:
        return 1 if m == 1 else DECODE_ROWS
    return min(DECODE_ROWS, 1 << (m - 1).bit_length())


def _gemv_plan(m: int, mt: int, in_f: int, out: int, kernel_regs: int, device: int) -> tuple:
    """(chunks, column tiles, K splits, 32-blocks per split, dynamic smem)."""
    chunks, tiles, nblk = -(-m // mt), -(-out // TILE_COLS), in_f // 32
    sms, regs_sm, smem_sm = _sm_limits(device)
    threads = GEMV_BLOCK[0] * GEMV_BLOCK[1]
    per_sm = max(1, min(8, regs_sm // (-(-kernel_regs // 8) * 8 * threads)))
    max_bps = max(1, STAGING_BYTES // (mt * 33 * 4))
    for _ in range(2):  # occupancy depends on smem, smem on the split size
        want = max(1, sms * per_sm // (tiles * chunks))
        bps = max(1, min(max(-(-nblk // want), KSLICES), max_bps, nblk))
        smem = 4 * max(mt * bps * 33, (KSLICES - 1) * mt * TILE_COLS)
        per_sm = max(1, min(per_sm, smem_sm // (smem + 1024)))
    return chunks, tiles, -(-nblk // bps), bps, smem


def _gemv(x, qweight, scales, qzeros, outlier_idx, oweight, bits, group_size, bias, table, slots):
    m, in_f = x.shape
    out, k, device = qweight.shape[1], outlier_idx.numel(), x.device
    table_ptr, slots_ptr, num_slots, slots64 = _slot_args(table, slots)
    vec = out % 4 == 0 and _aligned(qweight, to=16) and _aligned(scales, oweight, table, bias, to=8)
    mt = _rows_per_chunk(m, vec)
    kernel = _function("dequant_gemv.cu", f"dequant_gemv_{bits}_{mt}_{'vec' if vec else 'any'}",
                       device.index)  # fmt: skip
    chunks, tiles, nsplit, bps, smem = _gemv_plan(
        m, mt, in_f, out, getattr(kernel, "num_regs", 128), device.index
    )
    y = torch.empty(m, out, dtype=torch.float16, device=device)  # [M, out]
    out_pad = -(-out // 4) * 4
    partial = None  # [nsplit, M, out_pad] fp32 split partials
    if nsplit > 1:
        partial = torch.empty(nsplit * m * out_pad, dtype=torch.float32, device=device)
    tickets = _tickets(device, tiles * chunks)
    group_blocks = 0 if group_size == -1 else group_size // 32
    i32 = np.int32
    args = (
        x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), qzeros.data_ptr(),
        _ptr(outlier_idx) if k else 0, _ptr(oweight) if k else 0, table_ptr, slots_ptr,
        _ptr(bias), y.data_ptr(), _ptr(partial), tickets.data_ptr(),
        i32(m), i32(in_f), i32(out), i32(k), i32(num_slots), i32(group_blocks), i32(bps),
    )  # fmt: skip
    _launch(kernel, (tiles, nsplit, chunks), GEMV_BLOCK, args, smem, device.index)
    del slots64, partial  # kept alive until the launch is queued
    return y


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
    """Fused y = x @ dequant(Q) + x[:, idx] @ O[slot(row)] + bias in one launch (decode path).

    x: float16 [M, in] row-major, CUDA (any M; rows run in chunks of 8);
    qweight: int32 [in*bits/32, out] (packing.py layout); scales: float16 [groups, out];
    qzeros: int32 [groups, ceil(out/32)*bits]; outlier_idx: int32 [k] sorted unique;
    oweight: float16 [k, out] (slot 0); bias: float16 [out] or None;
    adapter_table: float16 [S, k, out] (slot s >= 1 = table[s-1]) or None;
    slots: int [M] or None (all slot 0; ignored without a table).
    Returns float16 [M, out]; fp32 accumulation, one rounding. Twin: `cuda_twins.dequant_gemv`.
    """
    _check_x(x)
    out = _check_packed(qweight, scales, qzeros, x.shape[1], bits, group_size, x.device)
    _check_weak(x, outlier_idx, oweight, adapter_table, slots, bias, out)
    if x.shape[0] == 0:
        return x.new_empty(0, out)
    return _gemv(x, qweight, scales, qzeros, outlier_idx, oweight, bits, group_size, bias,
                 adapter_table, slots)  # fmt: skip


# batched path ---------------------------------------------------------------------------------
def _dequantize(qweight, scales, qzeros, bits, group_size, in_f: int) -> torch.Tensor:
    out, device = qweight.shape[1], qweight.device
    w = torch.empty(in_f, out, dtype=torch.float16, device=device)  # [in, out] scratch
    vec = out % 4 == 0 and _aligned(qweight, to=16) and _aligned(scales, to=8)
    kernel = _function("dequant_gemv.cu", f"dequantize_fp16_{bits}_{'vec' if vec else 'any'}",
                       device.index)  # fmt: skip
    group_blocks = 0 if group_size == -1 else group_size // 32
    args = (qweight.data_ptr(), scales.data_ptr(), qzeros.data_ptr(), w.data_ptr(),
            np.int32(out), np.int32(group_blocks))  # fmt: skip
    grid = (-(-out // (DEQ_THREADS * 4)), in_f // 32, 1)
    _launch(kernel, grid, (DEQ_THREADS, 1, 1), args, 0, device.index)
    return w


def dequantize_fp16(
    qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Dense float16 [in, out] = (q - z) * s, bit-equal to `packing.dequantize(..., float16)`.

    qweight: int32 [in*bits/32, out] CUDA; scales: float16 [groups, out];
    qzeros: int32 [groups, ceil(out/32)*bits]. Twin: `cuda_twins.dequantize_fp16`.
    """
    if qweight.dim() != 2 or not qweight.is_cuda or qweight.shape[0] % bits:
        raise ValueError(
            f"qweight must be a CUDA int32 [in*bits/32, out] with rows a multiple of "
            f"bits={bits}, got {tuple(qweight.shape)} on {qweight.device}"
        )
    in_f = qweight.shape[0] * 32 // bits
    _check_packed(qweight, scales, qzeros, in_f, bits, group_size, qweight.device)
    return _dequantize(qweight, scales, qzeros, bits, group_size, in_f)


def _sgmv(x, outlier_idx, oweight, adapter_table, slots, bias, y, accumulate: bool):
    m, in_f = x.shape
    out, k, device = y.shape[1], outlier_idx.numel(), x.device
    table_ptr, slots_ptr, num_slots, slots64 = _slot_args(adapter_table, slots)
    vec = out % 4 == 0 and _aligned(oweight, adapter_table, bias, y, to=8)
    kernel = _function("weak_sgmv.cu", f"weak_columns_sgmv_{'vec' if vec else 'any'}", device.index)
    i32 = np.int32
    args = (
        x.data_ptr(), _ptr(outlier_idx) if k else 0, _ptr(oweight) if k else 0, table_ptr,
        slots_ptr, _ptr(bias), y.data_ptr(),
        i32(m), i32(in_f), i32(out), i32(k), i32(num_slots), i32(int(accumulate)),
    )  # fmt: skip
    grid = (-(-out // (SG_THREADS * 4)), -(-m // SG_ROWS), 1)
    _launch(kernel, grid, (SG_THREADS, 1, 1), args, 0, device.index)
    del slots64
    return y


def weak_columns_sgmv(
    x: torch.Tensor,
    outlier_idx: torch.Tensor,
    oweight: torch.Tensor,
    adapter_table: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row-slot weak columns in one launch: out (+)= x[:, idx] @ O[slot[b]] (+ bias).

    x: float16 [M, in] CUDA; outlier_idx: int32 [k]; oweight: float16 [k, N] (slot 0);
    adapter_table: float16 [S, k, N] or None; slots: int [M] or None; bias: float16 [N] or None;
    out: float16 [M, N] accumulated in place, or None (a new tensor). Returns [M, N].
    Twin: `cuda_twins.weak_columns_sgmv`.
    """
    _check_x(x)
    n = oweight.shape[-1]
    if out is not None:
        _expect("out", out, torch.float16, (x.shape[0], n), x.device)
    _check_weak(x, outlier_idx, oweight, adapter_table, slots, bias, n)
    y = out if out is not None else torch.empty(x.shape[0], n, dtype=torch.float16, device=x.device)
    if x.shape[0] == 0:
        return y
    return _sgmv(x, outlier_idx, oweight, adapter_table, slots, bias, y, out is not None)


# the layer op ---------------------------------------------------------------------------------
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
    """y = x @ dequant(Q) + x[:, idx] @ O[slot(row)] + bias; GPU twin of `reference.owq_matmul`.

    x: float16 [M, in] row-major contiguous CUDA; qweight: int32 [in*bits/32, out];
    scales: float16 [groups, out]; qzeros: int32 [groups, ceil(out/32)*bits];
    outlier_idx: int32 [k] sorted unique; oweight: float16 [k, out]; bias: float16 [out] or None;
    adapter_table: float16 [S, k, out] or None; slots: int [M] or None. Returns float16 [M, out].
    M <= GEMV_ROW_LIMIT: fused GEMV; larger M: dequantize scratch + cuBLAS + SGMV.
    """
    _check_x(x)
    out = _check_packed(qweight, scales, qzeros, x.shape[1], bits, group_size, x.device)
    k = _check_weak(x, outlier_idx, oweight, adapter_table, slots, bias, out)
    m = x.shape[0]
    if m == 0:
        return x.new_empty(0, out)
    if m <= GEMV_ROW_LIMIT:
        return _gemv(x, qweight, scales, qzeros, outlier_idx, oweight, bits, group_size, bias,
                     adapter_table, slots)  # fmt: skip
    w = _dequantize(qweight, scales, qzeros, bits, group_size, x.shape[1])  # [in, out] scratch
    if k == 0:
        return x @ w if bias is None else torch.addmm(bias, x, w)
    return _sgmv(x, outlier_idx, oweight, adapter_table, slots, bias, x @ w, accumulate=True)


def _row_slots(slots: torch.Tensor | None, lead: tuple, rows: int) -> torch.Tensor | None:
    """slots [B] for x [B, ..., in] -> per flattened row [rows]."""
    if slots is None:
        return None
    batch = lead[0] if lead else 1
    if tuple(slots.shape) != (batch,):
        raise ValueError(f"slots has shape {tuple(slots.shape)}, expected [{batch}]")
    return slots.to(torch.int64)[:, None].expand(batch, rows // max(batch, 1)).reshape(-1)


def _fp16(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float16).contiguous()


def linear_forward(
    x: torch.Tensor,
    packed: PackedWeight,
    weak: WeakColumns,
    bias: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """`OWQLinear.forward` for CUDA inputs without autograd: x [B, ..., in] (any float dtype),
    slots [B] or None -> [B, ..., out] in x.dtype."""
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, packed.in_features).to(torch.float16).contiguous()  # [rows, in]
    table = _fp16(weak.table)
    y = owq_matmul(
        x2, packed.qweight, packed.scales, packed.qzeros, weak.idx, table[0], packed.bits,
        packed.group_size, _fp16(bias), table[1:] if slots is not None else None,
        _row_slots(slots, lead, x2.shape[0]),
    )  # fmt: skip
    return y.reshape(*lead, packed.out_features).to(x.dtype)
