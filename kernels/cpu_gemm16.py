"""The 16-bit GEMM of CPU fast steps (`cpu_gemm16.cpp`): operands and twin.

y [M, out] = x [M, in] @ ((q − z)·s)ᵀ for a layer's codes q as stored (2, 3 or 4 bits), its zero
points z and fp32 scales s, per output and group. Each row of x is rounded to int16 with one
scale (absmax / 32767), each group's Σ (q − z)·xq is exact in int32, then scaled in fp32. A
row's numbers depend on nothing but that row. Three forms, the same bits: AMX (`tdpbssd` and
`tdpbusd` on each input's high and low byte, for steps of 5 rows or more), AVX-512 VNNI
(`vpdpwssd`, 8-row tiles) and AVX2 (`vpmaddwd`, 4-row tiles); the widest the CPU runs serves,
`OWQ_CPU_GEMM=vnni` or `avx2` caps it (read once by the module). `cpu_ops.plan`
gives a layer this kernel where `takes` says it can and `cpu_build.gemm16()` says the CPU runs
it; the compiled step (`cpu_decode`) and the eager blocks (`cpu_ops.dense`) then run the same
operands. Twin: `twin`, bit for bit. Knows the packed layout; nothing about models or requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cpu_build
from .packing import column_chunks, unpack_codes, unpack_zeros
from .types import PackedWeight

INT32 = 2**31


@dataclass(frozen=True)
class Int16Weight:
    """The kernel's operands: half a byte a weight, and a byte and a float per output and group."""

    codes: torch.Tensor  # uint8 [out / 16, in / 4, 32] (`pack`)
    scales: torch.Tensor  # fp32 [groups, out]
    zeros: torch.Tensor  # uint8 [groups, out]


def takes(packed: PackedWeight) -> bool:
    """A layer the kernel takes: outputs in 16s, groups of a multiple of 4 inputs, and a group's
    sum that cannot leave int32 (|q − z| < 2^bits times |xq| <= 32767 over the group)."""
    per = packed.in_features if packed.group_size == -1 else packed.group_size
    bound = per * (2**packed.bits - 1) * 32767
    return packed.bits <= 4 and packed.out_features % 16 == 0 and per % 4 == 0 and bound < INT32


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] in [0, 16) -> uint8 [N/16, K/4, 32]: byte 2l + j of (block, step) =
    c[16·block + l, 4·step + j] | c[16·block + l, 4·step + 2 + j] << 4, so one 32-byte load
    widened to int16 gives each of 16 lanes its (k, k+1) pair in the low nibbles and its
    (k+2, k+3) pair in the high ones."""
    n, k = codes.shape
    c = codes.view(n // 16, 16, k // 4, 4).permute(0, 2, 1, 3)  # [blocks, steps, lane, 4]
    return (c[..., :2] | (c[..., 2:] << 4)).to(torch.uint8).contiguous().view(n // 16, k // 4, 32)


def weight(packed: PackedWeight) -> Int16Weight:
    """The kernel's operands of a layer `takes` accepts, unpacked a chunk of outputs at a time
    (`column_chunks`: 1024 rows, a multiple of 16), so a head's temporaries stay small."""
    n, k = packed.out_features, packed.in_features
    codes = torch.empty(n // 16, k // 4, 32, dtype=torch.uint8)
    for rows in column_chunks(n):
        chunk = unpack_codes(packed.qweight[:, rows], packed.bits).t()  # [rows, in]
        codes[rows.start // 16 : rows.stop // 16] = pack(chunk)
    zeros = unpack_zeros(packed.qzeros, packed.bits, n).to(torch.uint8)
    return Int16Weight(codes, packed.scales.float().contiguous(), zeros.contiguous())


def mm(x: torch.Tensor, q: Int16Weight, form: int = 0) -> torch.Tensor:
    """x [M, in] -> [M, out] fp32 on the compiled kernel (`cpu_build.gemm16()` must be set);
    `form` caps the form (1 AVX2, 2 VNNI, 3 AMX; 0: the widest this CPU runs)."""
    return cpu_build.load().gemm16(x.float().contiguous(), q.codes, q.scales, q.zeros, form)


def twin(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """Exact emulation: x fp32 [M, in] -> [M, out]: each row rounded to int16 with one scale
    (absmax / 32767), each group's sum Σ (q − z)·xq exact, then in fp32 f = Σ_g float(sum_g)·s_g
    (fused multiply-adds, in group order) and y = f·sx."""
    g = packed.group_index()
    codes = unpack_codes(packed.qweight, packed.bits).t().double()  # [out, in]
    zeros = unpack_zeros(packed.qzeros, packed.bits, packed.out_features).double()  # [G, out]
    x = x.float()
    top = x.abs().amax(-1, keepdim=True)
    inv = torch.where(top > 0, torch.full_like(top, 32767) / top, 0)  # `32767 / top` would
    # take top's reciprocal first (torch's reversed division), an ulp off the kernel's quotient
    xq = torch.round(x * inv).double()
    f = torch.zeros(x.shape[0], packed.out_features, dtype=torch.float32)
    for group in range(packed.scales.shape[0]):
        cols = (g == group).nonzero().view(-1)
        sums = xq[:, cols] @ (codes[:, cols] - zeros[group][:, None]).t()  # exact: under 2^53
        f = (sums.float().double() * packed.scales[group].double() + f.double()).float()
    return f * (top / 32767)
