"""Asymmetric/symmetric uniform quantization grid: min-max scale and zero, rounding to codes.

Pure tensor maths shared by `OWQLinear.from_float` and the quantizer; knows nothing of layouts.
"""

from __future__ import annotations

import torch


def minmax_scale_zero(
    w: torch.Tensor, bits: int, sym: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """w: float [rows, cols] -> per-row (scale [rows], integer zero [rows]) of the min-max grid."""
    maxq = 2**bits - 1
    w = w.to(torch.float32)
    lo = torch.clamp(w.min(dim=1).values, max=0)
    hi = torch.clamp(w.max(dim=1).values, min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    flat = (lo == 0) & (hi == 0)
    lo = torch.where(flat, torch.full_like(lo, -1.0), lo)
    hi = torch.where(flat, torch.ones_like(hi), hi)
    scale = (hi - lo) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-lo / scale)
    return scale, zero


def round_to_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """w: float [rows, cols], scale/zero broadcastable [rows, 1] -> int64 codes in [0, 2**bits)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1).to(torch.int64)


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Quantize then dequantize w on the grid: (codes - zero) * scale."""
    return (round_to_codes(w, scale, zero, bits) - zero) * scale
