"""Memory accounting of weak-column tuning: RSS and the dense copies the quantized layers hold.

During training the dense part of every `OWQLinear` runs through the layer's own frozen-dense
autograd function (no weight saved for backward; on the CPU the layer's plan holds its one
dequantized copy, on CUDA it is dequantized again in backward). Knows `OWQLinear`, nothing about
data or adapters.
"""

from __future__ import annotations

import resource
import sys

from torch import nn

from owq.kernels.owq_linear import OWQLinear


def dense_cache_bytes(model: nn.Module) -> int:
    """Bytes held by the OWQLinear CPU plans (dequantized dense copies)."""
    total = 0
    for m in model.modules():
        if isinstance(m, OWQLinear) and m.cpu is not None:
            total += m.cpu.weight.numel() * m.cpu.weight.element_size()
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
