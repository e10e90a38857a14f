"""Memory discipline of weak-column tuning: a training forward for `OWQLinear` and RSS accounting.

During training every quantized layer runs `frozen_dense_forward`: the dense part goes through an
autograd function that keeps no weight for backward and asks the layer for its dequantized weight
again when the gradient w.r.t. the input is needed. On the CPU `OWQLinear.dense_weight` returns
its inference cache (one dequantized copy per layer, built on the first forward and kept by the
layer whether or not we train), so training adds no dense copy at all; on CUDA the weight is
dequantized, used and freed, so at most one layer's dense copy is alive at a time. The packed base
never gets a gradient. Knows `OWQLinear`, nothing about data or adapters.
"""

from __future__ import annotations

import contextlib
import resource
import sys

import torch
import torch.nn.functional as F
from torch import nn

from owq.kernels import reference
from owq.kernels.owq_linear import OWQLinear


class _FrozenDense(torch.autograd.Function):
    """y = x @ dequant(Q)ᵀ with dL/dx = dL/dy @ dequant(Q), recomputing the weight in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: OWQLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dense_weight(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.layer.dense_weight(grad.dtype)  # [out, in]
        return grad @ weight, None


def frozen_dense_forward(
    layer: OWQLinear, x: torch.Tensor, slots: torch.Tensor | None = None
) -> torch.Tensor:
    """Same result as `OWQLinear.forward` (slot 0), without saving a dense weight for backward."""
    if slots is not None:
        return OWQLinear.forward(layer, x, slots)
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, layer expects {layer.in_features}")
    y = _FrozenDense.apply(x, layer)
    if layer.num_weak:
        y = y + reference.weak_columns_product(x, layer.outlier_idx, layer.oweight)
    if layer.bias is not None:
        y = y + layer.bias.to(x.dtype)
    return y


@contextlib.contextmanager
def training_forward(model: nn.Module):
    """Route every OWQLinear of `model` through `frozen_dense_forward` inside the block."""
    layers = [m for m in model.modules() if isinstance(m, OWQLinear)]
    for layer in layers:
        layer.forward = frozen_dense_forward.__get__(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def dense_cache_bytes(model: nn.Module) -> int:
    """Bytes held by the OWQLinear CPU inference caches (dequantized dense copies)."""
    total = 0
    for m in model.modules():
        cache = getattr(m, "_dense_cache", None) if isinstance(m, OWQLinear) else None
        if cache is not None:
            total += cache.numel() * cache.element_size()
    return total


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (getrusage)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * resource.getpagesize()
