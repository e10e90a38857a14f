"""Quantization parameters (scale, zero) per row: min-max, or OWQ's truncation grid search.

OWQ (section "Quantization Configuration Search") narrows the min-max range by a 2-D grid search
over how far the minimum and the maximum are shrunk, keeping the pair with the lowest
(column-weighted) squared rounding error of each row. Pure tensor maths on a [rows, cols]
matrix (a row is an output channel or one group of it); knows nothing of layers or models.
"""

from __future__ import annotations

import torch

COARSE = tuple(1.0 - 0.05 * i for i in range(10))  # shrink factors 1.00 .. 0.55
STEPS = (-0.1, -0.05, 0.05, 0.1)  # per-end refinement around the coarse optimum
FINE = (-0.025, 0.0, 0.025)  # joint final refinement
MIN_SCALE = 1e-6
MIN_FACTOR = 0.2


def _grid_for(lo: torch.Tensor, hi: torch.Tensor, maxq: int, sym: bool, fp16_scale: bool = True):
    """lo, hi: [rows] range ends -> (scale, zero) of that grid.

    The scale is rounded to fp16 (the stored dtype) before the zero point is chosen, so GPTQ
    compensates exactly the grid that is saved; `fp16_scale=False` keeps the fp32 scale, as the
    reference GPTQ does (it stores its dequantized weights in fp16 instead).
    """
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    flat = (hi - lo) <= 0
    lo = torch.where(flat, torch.full_like(lo, -1.0), lo)
    hi = torch.where(flat, torch.ones_like(hi), hi)
    scale = ((hi - lo) / maxq).clamp(min=MIN_SCALE)
    if fp16_scale:
        scale = scale.to(torch.float16).to(torch.float32).clamp(min=MIN_SCALE)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def minmax_params(w: torch.Tensor, bits: int, sym: bool = False):
    """w: [rows, cols] -> (scale [rows], zero [rows]) of the min-max grid (zero included)."""
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    return _grid_for(lo, hi, 2**bits - 1, sym)


class _RangeSearch:
    """Per-row best (lo, hi) shrink factors of one [rows, cols] matrix under weighted error."""

    def __init__(self, w: torch.Tensor, weights: torch.Tensor, bits: int, sym: bool):
        self.w, self.weights, self.maxq, self.sym = w, weights, 2**bits - 1, sym
        self.lo0 = w.min(dim=1).values.clamp(max=0)
        self.hi0 = w.max(dim=1).values.clamp(min=0)
        if sym:  # one range: shrink max|w| only (lo = -hi inside _grid_for)
            self.hi0 = torch.maximum(self.lo0.abs(), self.hi0)
            self.lo0 = torch.zeros_like(self.hi0)
        rows = w.shape[0]
        self.err = torch.full((rows,), float("inf"))
        self.lo_f, self.hi_f = torch.ones(rows), torch.ones(rows)
        self.buffer = torch.empty_like(w)

    def error(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Σ_j c_j (w_ij − q(w_ij))² per row for the grid spanning [lo, hi]; [rows]."""
        scale, zero = _grid_for(lo, hi, self.maxq, self.sym)
        s, z = scale[:, None], zero[:, None]
        t = torch.div(self.w, s, out=self.buffer)
        t.round_().add_(z).clamp_(0, self.maxq).sub_(z).mul_(s).sub_(self.w).square_()
        return t @ self.weights

    def try_factors(self, lo_f: torch.Tensor, hi_f: torch.Tensor) -> None:
        lo_f, hi_f = lo_f.clamp(MIN_FACTOR, 1.0), hi_f.clamp(MIN_FACTOR, 1.0)
        err = self.error(self.lo0 * lo_f, self.hi0 * hi_f)
        better = err < self.err
        self.err = torch.where(better, err, self.err)
        self.lo_f = torch.where(better, lo_f, self.lo_f)
        self.hi_f = torch.where(better, hi_f, self.hi_f)

    def params(self):
        return _grid_for(self.lo0 * self.lo_f, self.hi0 * self.hi_f, self.maxq, self.sym)


def search_params(
    w: torch.Tensor, bits: int, sym: bool = False, weights: torch.Tensor | None = None
):
    """w: [rows, cols], weights: [cols] or None -> (scale [rows], zero [rows]) with truncation.

    A 2-D search over how far min and max are shrunk, by coordinate steps: both ends by one
    factor (coarse), then each end alone around the best, then a joint fine 3×3 grid.
    """
    w = w.to(torch.float32).contiguous()
    weights = torch.ones(w.shape[1]) if weights is None else weights.to(torch.float32)
    search = _RangeSearch(w, weights, bits, sym)
    ones = torch.ones(w.shape[0])
    for f in COARSE:
        search.try_factors(ones * f, ones * f)
    if not sym:
        lo_best = search.lo_f.clone()
        for step in STEPS:
            search.try_factors(lo_best + step, search.hi_f)
        hi_best = search.hi_f.clone()
        for step in STEPS:
            search.try_factors(search.lo_f, hi_best + step)
    lo_best, hi_best = search.lo_f.clone(), search.hi_f.clone()
    for a in FINE:
        for b in FINE:
            if (a, b) != (0.0, 0.0) and not (sym and a != 0.0):
                search.try_factors(lo_best + a, hi_best + b)
    return search.params()


def fit_params(
    w: torch.Tensor, bits: int, sym: bool, search: bool, weights: torch.Tensor | None = None
):
    """Dispatch: truncation search or min-max, on a [rows, cols] matrix."""
    if search:
        return search_params(w, bits, sym, weights)
    return minmax_params(w, bits, sym)


def fit_group_params(
    W: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    search: bool,
    weights: torch.Tensor | None = None,
):
    """W: [out, in] -> (scale [groups, out], zero [groups, out]), groups in input order."""
    out_f, in_f = W.shape
    size = in_f if group_size == -1 else group_size
    scales, zeros = [], []
    for start in range(0, in_f, size):
        cols = slice(start, start + size)
        s, z = fit_params(W[:, cols], bits, sym, search, None if weights is None else weights[cols])
        scales.append(s)
        zeros.append(z)
    return torch.stack(scales), torch.stack(zeros)
