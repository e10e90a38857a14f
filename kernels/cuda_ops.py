"""The GPU ops of a quantized linear layer: fused dequant-GEMV, dequantize, per-row-slot SGMV,
the layer op, and `OWQLinear`'s CUDA forward. Each takes the value types (`PackedWeight`,
`WeakColumns`) and has a torch twin with the same signature (`reference.owq_matmul`,
`cuda_twins`).

Dispatch in `owq_matmul` for x [M, in]:
- M <= GEMV_ROW_LIMIT: `dequant_gemv`, one launch: fused unpack + dequant + FMA (fp32), weak
  columns with per-row slots and bias in the same launch; M > 8 runs as chunks of 8 rows
  (grid z), each chunk re-reading the packed weight, mostly from L2.
- M > GEMV_ROW_LIMIT: the dequantize kernel into a transient scratch [in, out], cuBLAS
  (`torch.matmul`), then `weak_columns_sgmv` adds the weak columns of every row's own slot and the
  bias in one launch. The dense copy is never kept.
Expected crossover (H100, in=4096, out=11008, 3-bit), to be confirmed with
`benchmarks/gpu_kernels.py`: an 8-row chunk of the GEMV is FMA-bound at ~15-20 us; the batched path
costs a fixed ~35 us dequantize (17 MB read, 90 MB written) plus a GEMM that stays memory-bound
(~30 us) up to M of a few hundred, so the chunked GEMV wins up to M ~ 24-32: GEMV_ROW_LIMIT = 32.

Activations: the kernels read and write float16 or bfloat16 (`ACTIVATIONS`, fp32 sums either
way, so bf16 activations past fp16's 65,504 are fine); `linear_forward` runs float32 inputs on the
float32 twin rather than rounding them to a 16-bit type. A slot id outside [0, S] or a weak
column index outside [0, in) turns its row NaN in the kernels (never another adapter's columns);
`WeakColumns.check_slots` / `check_indices` raise where slots are set and indices loaded.
Results are bitwise reproducible per device model (the split-K plan follows the SM count).
Compiling and launching go through the current `Backend` (`use_backend`). Knows the packed layout
and nothing about models, checkpoints or serving; it never caches a dequantized weight.
"""

from __future__ import annotations

import torch

from . import cuda_launch, reference
from .cuda_build import Backend, current_backend, use_backend
from .packing import check_layout, num_groups
from .types import PackedWeight, WeakColumns

__all__ = [
    "available",
    "dequant_gemv",
    "dequantize_fp16",
    "linear_forward",
    "owq_matmul",
    "use_backend",
    "weak_columns_sgmv",
]

GEMV_ROW_LIMIT = 32  # M above this takes the dequantize + cuBLAS path
ACTIVATIONS = (torch.float16, torch.bfloat16)


def available() -> bool:
    """True when the current backend can run (CuPy imports and torch sees a CUDA device)."""
    return current_backend().available()


# argument checks ------------------------------------------------------------------------------
def _expect(name: str, t: torch.Tensor, dtype, shape: tuple, device) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {list(shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor on {device}, got {t.device}")


def _check_x(x: torch.Tensor, backend: Backend) -> None:
    if x.dim() != 2 or x.dtype not in ACTIVATIONS or not x.is_contiguous():
        raise ValueError(
            f"x must be a contiguous float16 or bfloat16 tensor [M, in], got {x.dtype} "
            f"{tuple(x.shape)}"
        )
    if x.device.type != backend.device_type:
        raise ValueError(f"x must be a {backend.device_type.upper()} tensor, got {x.device}")


def _check_packed(packed: PackedWeight, in_f: int, device) -> int:
    q = packed.qweight
    if q.dim() != 2:
        raise ValueError(f"qweight must be 2-D [in*bits/32, out], got {tuple(q.shape)}")
    out, bits = q.shape[1], packed.bits
    check_layout(in_f, out, bits, packed.group_size)
    groups = num_groups(in_f, packed.group_size)
    _expect("qweight", q, torch.int32, (in_f * bits // 32, out), device)
    _expect("scales", packed.scales, torch.float16, (groups, out), device)
    _expect("qzeros", packed.qzeros, torch.int32, (groups, -(-out // 32) * bits), device)
    return out


def _check_weak(weak: WeakColumns, out: int, device) -> None:
    k = weak.k
    _expect("outlier_idx", weak.idx, torch.int32, (k,), device)
    table = weak.table
    if table.dim() != 3 or table.shape[0] < 1:
        raise ValueError(f"weak table must be [S+1, {k}, {out}], got {tuple(table.shape)}")
    _expect("weak table", table, torch.float16, (table.shape[0], k, out), device)


def _check_rows(m: int, out: int, bias, slots, device) -> torch.Tensor | None:
    """bias float16 [out] or None; slots integer [M] or None -> int64 [M] or None."""
    if bias is not None:
        _expect("bias", bias, torch.float16, (out,), device)
    if slots is None:
        return None
    if tuple(slots.shape) != (m,) or slots.is_floating_point() or slots.device != device:
        raise ValueError(
            f"slots must be an integer tensor [{m}] on {device}, got "
            f"{slots.dtype} {tuple(slots.shape)} on {slots.device}"
        )
    return slots.to(torch.int64).contiguous()


def _checked(x, packed: PackedWeight, weak: WeakColumns, bias, slots):
    """(backend, out, slots as int64 or None) after checking every argument."""
    backend = current_backend()
    _check_x(x, backend)
    out = _check_packed(packed, x.shape[1], x.device)
    _check_weak(weak, out, x.device)
    return backend, out, _check_rows(x.shape[0], out, bias, slots, x.device)


# the ops --------------------------------------------------------------------------------------
def dequant_gemv(
    x: torch.Tensor,
    packed: PackedWeight,
    weak: WeakColumns,
    bias: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused y = x @ dequant(Q) + x[:, idx] @ table[slot(row)] + bias in one launch (decode path).

    x: float16 or bfloat16 [M, in] row-major contiguous CUDA (any M; rows run in chunks of 8);
    packed: qweight int32 [in*bits/32, out], scales float16 [groups, out], qzeros int32
    [groups, ceil(out/32)*bits]; weak: idx int32 [k] (< in), table float16 [S+1, k, out]
    contiguous; bias: float16 [out] or None; slots: int32/int64 [M] in [0, S] or None (slot 0).
    Returns [M, out] in x's dtype; fp32 accumulation, one rounding. Twin: `cuda_twins.dequant_gemv`.
    """
    backend, out, slots64 = _checked(x, packed, weak, bias, slots)
    if x.shape[0] == 0:
        return x.new_empty(0, out)
    return cuda_launch.gemv(x, packed, weak, bias, slots64, backend)


def dequantize_fp16(packed: PackedWeight) -> torch.Tensor:
    """Dense float16 [in, out] = (q - z) * s, bit-equal to `packing.dequantize(..., float16)`.

    packed: qweight int32 [in*bits/32, out] CUDA, scales float16 [groups, out], qzeros int32
    [groups, ceil(out/32)*bits]. Twin: `cuda_twins.dequantize_fp16`.
    """
    backend, q = current_backend(), packed.qweight
    if q.dim() != 2 or q.device.type != backend.device_type or q.shape[0] % packed.bits:
        raise ValueError(
            f"qweight must be a {backend.device_type.upper()} int32 [in*bits/32, out] with rows "
            f"a multiple of bits={packed.bits}, got {tuple(q.shape)} on {q.device}"
        )
    _check_packed(packed, packed.in_features, q.device)
    return cuda_launch.dequantize(packed, torch.float16, backend)


def weak_columns_sgmv(
    x: torch.Tensor,
    weak: WeakColumns,
    slots: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row-slot weak columns in one launch: out (+)= x[:, idx] @ table[slot[b]] (+ bias).

    x: float16 or bfloat16 [M, in] CUDA; weak: idx int32 [k], table float16 [S+1, k, N];
    slots: int [M] or None (slot 0); bias: float16 [N] or None; out: [M, N] in x's dtype, added
    to in place, or None (a new tensor). Returns [M, N]. Twin: `cuda_twins.weak_columns_sgmv`.
    """
    backend = current_backend()
    _check_x(x, backend)
    n = weak.out_features
    _check_weak(weak, n, x.device)
    slots64 = _check_rows(x.shape[0], n, bias, slots, x.device)
    if out is not None:
        _expect("out", out, x.dtype, (x.shape[0], n), x.device)
    y = out if out is not None else backend.empty((x.shape[0], n), x.dtype, x.device)
    if x.shape[0] == 0:
        return y
    return cuda_launch.sgmv(x, weak, slots64, bias, y, out is not None, backend)


def owq_matmul(
    x: torch.Tensor,
    packed: PackedWeight,
    weak: WeakColumns,
    bias: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequant(Q) + x[:, idx] @ table[slot(row)] + bias; GPU twin of
    `reference.owq_matmul`. Arguments as `dequant_gemv`; M <= GEMV_ROW_LIMIT: fused GEMV; larger
    M: dequantize scratch + cuBLAS + SGMV. Returns [M, out] in x's dtype."""
    backend, out, slots64 = _checked(x, packed, weak, bias, slots)
    m = x.shape[0]
    if m == 0:
        return x.new_empty(0, out)
    if m <= GEMV_ROW_LIMIT:
        return cuda_launch.gemv(x, packed, weak, bias, slots64, backend)
    w = cuda_launch.dequantize(packed, x.dtype, backend)  # [in, out] scratch
    y = backend.empty((m, out), x.dtype, x.device)
    if weak.k == 0:
        if bias is None:
            return torch.matmul(x, w, out=y)
        return torch.addmm(bias.to(x.dtype), x, w, out=y)
    torch.matmul(x, w, out=y)
    return cuda_launch.sgmv(x, weak, slots64, bias, y, True, backend)


def _row_slots(slots, weak: WeakColumns, lead: tuple, rows: int, device) -> torch.Tensor | None:
    """slots [B] for x [B, ..., in] -> int64 per flattened row [rows] on `device`; host slots
    are range-checked here (no device sync)."""
    if slots is None:
        return None
    batch = lead[0] if lead else 1
    if tuple(slots.shape) != (batch,) or slots.is_floating_point():
        raise ValueError(
            f"slots must be integers [{batch}], got {slots.dtype} {tuple(slots.shape)}"
        )
    if slots.device.type == "cpu":
        weak.check_slots(slots)
    per_row = slots.to(device=device, dtype=torch.int64)
    return per_row[:, None].expand(batch, rows // max(batch, 1)).reshape(-1)


def linear_forward(
    x: torch.Tensor,
    packed: PackedWeight,
    weak: WeakColumns,
    bias: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """`OWQLinear.forward` for CUDA inputs without autograd: x [B, ..., in] float16, bfloat16
    (kernels) or float32 (the float32 twin), slots [B] or None -> [B, ..., out] in x.dtype."""
    if x.dtype not in ACTIVATIONS:
        return reference.owq_matmul(x, packed, weak, bias, slots)
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, packed.in_features).contiguous()  # [rows, in]
    table = weak.table.detach().to(torch.float16).contiguous()
    row_slots = _row_slots(slots, weak, lead, x2.shape[0], x.device)
    fp16_bias = None if bias is None else bias.detach().to(torch.float16).contiguous()
    y = owq_matmul(x2, packed, WeakColumns(weak.idx, table), fp16_bias, row_slots)
    return y.reshape(*lead, packed.out_features)
