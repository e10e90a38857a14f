"""torch's intra-op threads, held to one where many threads would cost more than they give.

`single_thread()` runs a block on the calling thread alone. Two users:

- the quantizer's per-layer maths (grid search, GPTQ's column loop): many small tensors, where
  one thread is as fast on an idle machine and ~10x faster on a shared one (no barrier waits);
- work a server does on a helper thread (reading an adapter). OpenMP gives every thread that
  opens a parallel region a team of its own. Once two teams exist on a 2-core machine, libgomp
  counts more threads than cores and its workers stop spinning between regions: each of the
  hundreds of short regions of a decode step then waits for a sleeping worker to wake. A lone
  stream's token took 12.5 ms instead of 8.9 ms that way (`BENCHMARKS.md`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_LOCK = threading.RLock()


@contextmanager
def single_thread() -> Iterator[None]:
    """torch on this thread only, inside the block. OpenMP's thread count is per thread, so
    threads that run already keep theirs; torch's process-wide count, which a thread started
    meanwhile takes, is 1 during the block (a thread that must have more sets its own, as the
    engine's model thread does). One block at a time, so that each restores what it found: a
    block must not wait on another thread that may enter one."""
    with _LOCK:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)
