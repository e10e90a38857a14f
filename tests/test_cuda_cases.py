"""Helpers of the CUDA kernel tests, on a GPU and on the CPU emulator (no tests here).

Layers are built from random codes / scales / zeros through `OWQLinear.from_codes`, so the fp32
twin is exact by construction; the kernels may differ by their one output rounding only
(tolerances keyed by dtype, atol scaled by sqrt(K)).
"""

from __future__ import annotations

import functools
import math

import torch

from owq.kernels import reference
from owq.kernels.owq_linear import OWQLinear
from owq.kernels.types import WeakColumns

RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
ATOL_PER_SQRT_K = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 1e-6}
NUM_SLOTS = 16
SLOT_MIXES = ("none", "one", "distinct", "random", "int32")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, k_dim: int, dtype=torch.float16):
    atol = ATOL_PER_SQRT_K[dtype] * math.sqrt(k_dim) * max(1.0, float(expected.abs().mean()))
    torch.testing.assert_close(actual.float(), expected.float(), rtol=RTOL[dtype], atol=atol)


@functools.lru_cache(maxsize=64)
def make_layer(
    in_f: int, out: int, bits: int, group: int, k: int, bias: bool = False, slots: int = NUM_SLOTS
) -> OWQLinear:
    """Random packed CPU layer with `slots` adapter slots (seeded by its arguments); callers
    that move it to a device copy it first."""
    gen = torch.Generator().manual_seed(in_f * 1_000_003 + out * 7919 + bits * 101 + group + k)
    groups = 1 if group == -1 else in_f // group
    codes = torch.randint(0, 2**bits, (out, in_f), generator=gen)
    scales = torch.rand(groups, out, generator=gen) * 0.02 + 0.002
    zeros = torch.randint(0, 2**bits, (groups, out), generator=gen)
    idx = torch.randperm(in_f, generator=gen)[:k]
    oweight = torch.randn(out, k, generator=gen) * 0.05
    b = torch.randn(out, generator=gen) * 0.1 if bias else None
    layer = OWQLinear.from_codes(codes, scales, zeros, bits, group, idx, oweight, b)
    layer.resize_slots(slots)
    for slot in range(1, slots + 1):
        layer.set_slot(slot, torch.randn(k, out, generator=gen) * 0.05)
    return layer.requires_grad_(False)


def exact(x: torch.Tensor, layer: OWQLinear, slots=None, bias: bool = True) -> torch.Tensor:
    """fp32 twin of the layer op (dequantized weights are exact in fp32)."""
    weak = WeakColumns(layer.outlier_idx, layer.weak_table.float())
    b = layer.bias.float() if bias and layer.bias is not None else None
    return reference.owq_matmul(x.float(), layer.packed, weak, b, slots)


def make_x(m: int, in_f: int, seed: int = 0, dtype=torch.float16, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 7919 + m)
    return torch.randn(m, in_f, generator=gen).to(dtype=dtype, device=device)


def make_slots(mix: str, m: int, num_slots: int = NUM_SLOTS, seed: int = 0, device="cpu"):
    """Slot ids [M] of a mix: none (None), one slot, distinct, random; int32 = distinct as int32."""
    if mix == "none":
        return None
    if mix == "one":
        slots = torch.full((m,), min(3, num_slots), dtype=torch.int64)
    elif mix in ("distinct", "int32"):
        slots = torch.arange(m) % (num_slots + 1)
    else:
        gen = torch.Generator().manual_seed(seed + m)
        slots = torch.randint(0, num_slots + 1, (m,), generator=gen)
    return slots.to(dtype=torch.int32 if mix == "int32" else torch.int64, device=device)
