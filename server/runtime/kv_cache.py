"""Fixed-slot KV cache and the attention over it, shared by every model family.

One pair of tensors per layer, `[rows, kv_heads, max_context, head_dim]`, allocated once (on
the CPU as zero pages that become resident as they are written: memory follows the positions
used, not rows × max_context): each batch row owns one cache row and its own position. A step
writes its new keys/values in place (`index_copy_` at per-row positions; a slice for one row)
and attends over `cache[rows, :, :length]` with an explicit mask, so rows at different positions
share one batched call. Knows nothing about requests, adapters or a model family's layer names.
"""

from __future__ import annotations

import math
import mmap
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CacheShape:
    layers: int
    rows: int
    kv_heads: int
    max_context: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"


@dataclass(frozen=True)
class StepIndex:
    """Where one forward step reads and writes: cache rows `row0 .. row0+B`, new tokens at
    `positions`, attention over the first `length` cache positions."""

    row0: int
    positions: torch.Tensor  # long [B, T]
    write_index: torch.Tensor  # long [B*T*H]: flat index into a layer's [rows*H*max_context, D]
    mask: torch.Tensor | None  # bool [B, 1, T, length]: True = attend; None = attend to all
    length: int
    decode: bool = False  # a decode step (one new token per running row), not a prefill
    fast: bool = False  # the layers may take their fast kernels (not when prompts are scored)
    start: int | None = None  # one row whose tokens sit at start, start+1, ...: a slice write

    @property
    def rows(self) -> slice:
        return slice(self.row0, self.row0 + self.positions.shape[0])


class ZeroPages:
    """`count` zero CPU tensors of `size` in one private anonymous memory map (Linux: see
    `available`): the kernel hands out zero pages as they are first written, so resident memory
    follows the positions a server has used, not rows × max_context (`torch.zeros` writes, and
    so commits, every page; no huge pages, which would commit 2 MiB at a time). `clear` zeroes
    by giving pages back, so zeroing does not commit them either."""

    @staticmethod
    def available() -> bool:
        """Only Linux promises that a private anonymous page given back reads as zero again."""
        return sys.platform.startswith("linux") and hasattr(mmap, "MAP_ANONYMOUS")

    def __init__(self, count: int, size: tuple[int, ...], dtype: torch.dtype):
        self.size = size
        self.bytes = math.prod(size) * dtype.itemsize  # per tensor
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        self._memory = mmap.mmap(-1, max(mmap.PAGESIZE, self.bytes * count), flags=flags)
        self._export = memoryview(self._memory)  # the map cannot be closed under the tensors
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            self._memory.madvise(mmap.MADV_NOHUGEPAGE)
        n = math.prod(size)
        flat = torch.frombuffer(self._memory, dtype=dtype, count=n * count)
        self.tensors = [flat[i * n : (i + 1) * n].view(size) for i in range(count)]

    def clear(self, row: int | None = None) -> None:
        """Zero every tensor's `row` (its first index), or all of every tensor: whole pages are
        given back (they read as zeros again), the rest written."""
        if row is not None and not 0 <= row < self.size[0]:
            raise IndexError(f"row {row} out of range 0..{self.size[0] - 1}")
        if row is None:
            if not self._give_back(0, len(self._memory)):
                for tensor in self.tensors:
                    tensor.zero_()
            return
        per_row = self.bytes // self.size[0]
        for i, tensor in enumerate(self.tensors):
            start = i * self.bytes + row * per_row
            first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
            last = (start + per_row) // mmap.PAGESIZE * mmap.PAGESIZE
            if last - first < mmap.PAGESIZE or not self._give_back(first, last - first):
                tensor[row].zero_()  # under a page, or pages that cannot be given back
                continue
            flat = tensor[row].view(-1).view(torch.uint8)  # the partial pages at both ends
            flat[: first - start].zero_()
            flat[last - start :].zero_()

    def _give_back(self, start: int, length: int) -> bool:
        try:
            self._memory.madvise(mmap.MADV_DONTNEED, start, length)
        except OSError:  # e.g. pages locked by mlockall
            return False
        return True


class KVCache:
    def __init__(self, shape: CacheShape):
        self.shape = shape
        size = (shape.rows, shape.kv_heads, shape.max_context, shape.head_dim)
        self.pages: list[ZeroPages] = []
        if torch.device(shape.device).type == "cpu" and ZeroPages.available():
            self.pages = [ZeroPages(shape.layers, size, shape.dtype) for _ in "kv"]
            self.k, self.v = (pages.tensors for pages in self.pages)
            return
        kw = {"dtype": shape.dtype, "device": shape.device}
        self.k = [torch.zeros(size, **kw) for _ in range(shape.layers)]
        self.v = [torch.zeros(size, **kw) for _ in range(shape.layers)]

    @property
    def lazy(self) -> bool:
        """Resident only where written (the CPU on Linux); else all committed up front."""
        return bool(self.pages)

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values at every row's full context."""
        return sum(t.nbytes for t in self.k + self.v)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: StepIndex) -> None:
        """k, v: [B, T, H, D] or [B, T, H*D] (the projections' natural layout), written at
        step.positions."""
        d = self.shape.head_dim
        if step.start is not None:  # one row, consecutive positions: a plain slice copy
            t = k.shape[1]
            span = slice(step.start, step.start + t)
            self.k[layer][step.row0, :, span].copy_(k[0].reshape(t, -1, d).transpose(0, 1))
            self.v[layer][step.row0, :, span].copy_(v[0].reshape(t, -1, d).transpose(0, 1))
            return
        self.k[layer].view(-1, d).index_copy_(0, step.write_index, k.reshape(-1, d))
        self.v[layer].view(-1, d).index_copy_(0, step.write_index, v.reshape(-1, d))

    def read(self, layer: int, step: StepIndex) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [B, H, length, D] of the step's rows (no copy)."""
        rows = step.rows
        return self.k[layer][rows, :, : step.length], self.v[layer][rows, :, : step.length]

    def zero(self, row: int | None = None) -> None:
        """Zero one cache row (all layers), or the whole cache when `row` is None; on the CPU
        by giving the pages back, so that a failed step does not make the whole cache resident."""
        if self.pages:
            for pages in self.pages:
                pages.clear(row)
            return
        for k, v in zip(self.k, self.v, strict=True):
            (k if row is None else k[row]).zero_()
            (v if row is None else v[row]).zero_()

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of cache row `src` into row `dst` (all layers)."""
        if src == dst or length == 0:
            return
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :length].copy_(k[src, :, :length])
            v[dst, :, :length].copy_(v[src, :, :length])


def step_index(
    shape: CacheShape,
    row0: int,
    positions: torch.Tensor,
    decode: bool = False,
    fast: bool | None = None,
) -> StepIndex:
    """positions: long [B, T], absolute position of each new token of rows row0 .. row0+B;
    `decode`: the step extends running rows by one token; `fast` (default: `decode`): the layers
    may take their fast kernels, which a step that scores its prompt's tokens must not."""
    if decode and positions.shape[1] != 1:
        raise ValueError(f"a decode step has one token per row, got {positions.shape[1]}")
    batch, _ = positions.shape
    heads, ctx = shape.kv_heads, shape.max_context
    rows = torch.arange(row0, row0 + batch, device=positions.device)
    base = (rows[:, None, None] * heads + torch.arange(heads, device=positions.device)) * ctx
    write_index = (base + positions[:, :, None]).reshape(-1)  # [B, T, H] -> [B*T*H]
    length = int(positions.max()) + 1
    start = None  # a slice write: one row on the CPU (no device sync), inside the cache
    if batch == 1 and positions.device.type == "cpu":
        first, t = int(positions[0, 0]), positions.shape[1]
        if first + t <= ctx and torch.equal(positions[0], torch.arange(first, first + t)):
            start = first
    mask = None  # one row decoding attends to its whole cache: no mask at all
    if not (decode and batch == 1):
        keys = torch.arange(length, device=positions.device)
        mask = (keys[None, None, None, :] <= positions[:, None, :, None]).contiguous()
    fast = decode if fast is None else fast
    return StepIndex(row0, positions, write_index, mask, length, decode, fast, start)


def group_mask(mask: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """[B, 1, T, L] -> [B, 1, G*T, L] for queries folded as (group, token); once per step."""
    if mask is None or groups == 1 or mask.shape[2] == 1:
        return mask
    b, _, t, length = mask.shape
    return mask[:, :, None].expand(b, 1, groups, t, length).reshape(b, 1, groups * t, length)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Grouped-query attention over the cache without repeating keys.

    q: [B, T, Hq, D]; k, v: [B, Hkv, L, D]; mask: group_mask(...) [B, 1, G*T, L].
    Query head h*G + g uses key head h (transformers' repeat_kv order). Returns [B, T, Hq*D].
    """
    b, t, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qf = q.reshape(b, t, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * t, d)
    o = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale)  # [B, Hkv, G*T, D]
    return o.view(b, hkv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, hq * d)
