"""Fused CPU step of a stack of pre-norm RoPE blocks (`cpu_decode.cpp`).

One call runs every block of a fast step, one token per row: RMSNorm, each projection on its
plan's low-bit kernel plus its weak columns from each row's own slot, per-head q/k RMSNorm where
the model has it (Qwen3), RoPE, the KV-cache write, grouped-query attention over each row's
positions, the gated SiLU MLP, the residuals. A decode step's rows are one token of each
sequence; a prompt's tokens are rows of one cache row.
The eager block does ~60 small torch ops per block; at batch 1 their dispatch, not the bytes
of the low-bit codes, was most of a step. Twin: the runtime's eager block
(`server/runtime/llama.py`), matched to fp32 rounding by the tests for rows on the base and
for fp32 slot tables; on fp16 tables the eager bag rounds a row's weak sum to fp16 and this step
keeps it in fp32 (about 1% of the logits on the tests' random adapters).

Each projection runs the kernel its CPU plan chose (`cpu_ops.plan`): the 16-bit GEMM of
`cpu_gemm16.cpp` on x86 CPUs with AVX2 (its AMX, VNNI or AVX2 form), torch's 4-bit kernel
elsewhere; the eager blocks run the same one. The module comes from `cpu_build.load()`.
`DecodeStack` holds a runtime's layers' operands, read once from their CPU plans, and checks on
every step that those plans are still the layers' own. Knows the plans' kernels and the block's
maths; nothing about model families' names, requests or adapters by name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .cpu_build import load
from .owq_linear import OWQLinear

log = logging.getLogger(__name__)


def _none() -> torch.Tensor:
    return torch.empty(0)


def operands(layer: OWQLinear) -> tuple[list[torch.Tensor], list[int]] | None:
    """One projection's operands for the C++ stack from its CPU plan, or None where the layer
    takes no low-bit kernel (or runs its reference path): [torch's 4-bit kernel's three, idx,
    bias, spans, the 16-bit GEMM's three], the form the plan does not use empty."""
    plan = layer.cpu
    if layer.force_reference or plan is None or plan.kernel is None:
        return None
    if plan.dtype != torch.float32 or layer.trainable is not None:
        return None
    idx = plan.idx if plan.idx is not None else layer.outlier_idx.long()
    bias = _none() if layer.bias is None else layer.bias.float().contiguous()
    common = [idx if layer.num_weak else _none(), bias, spans(layer)]
    if plan.int16 is not None:
        q16 = plan.int16
        tensors = [_none()] * 3 + common + [q16.codes, q16.scales, q16.zeros]
        return tensors, [0, 0, layer.out_features]
    q = plan.int4
    correction = _none() if q.correction is None else q.correction
    tensors = [q.packed, q.scale_zero, correction] + common + [_none()] * 3
    return tensors, [q.group, q.group_size, layer.out_features]


def spans(layer: OWQLinear) -> torch.Tensor:
    """long [R, 3]: (weak row, first output, outputs) for each table row of each part: a fused
    layer's table is zero outside its parts (`kernels.fused`), which the step need not read."""
    rows = [(int(j), part.offset, part.out_features) for part in layer.parts for j in part.rows]
    return torch.tensor(rows, dtype=torch.long).view(-1, 3)


class DecodeStack:
    """The compiled stack over blocks of four projections each (q/k/v fused, o, gate/up fused,
    down) and their two norms. `step` runs a decode step; it returns None (the caller then runs
    the eager blocks) where a layer's plan changed since the stack was built."""

    def __init__(self, module, layers: Sequence[OWQLinear], ops: Sequence[tuple],
                 norms: Sequence[torch.Tensor], qk_norms: Sequence[torch.Tensor],
                 cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                 eps: float):  # fmt: skip
        # ops: each layer's `operands`, none of them None (`build`); norms: two a block (before
        # attention, before the MLP); qk_norms: none, or two a block (per-head q, k; Qwen3)
        self.layers = list(layers)
        self.plans = [layer.cpu for layer in layers]
        self.stale = False  # warned once that a plan changed under the stack
        self.gemm16 = any(plan.int16 is not None for plan in self.plans)  # on the 16-bit GEMM
        self.stack = module.Stack(
            [op[0] for op in ops], [op[1] for op in ops], [n.float().contiguous() for n in norms],
            [n.float().contiguous() for n in qk_norms], cos.float().contiguous(),
            sin.float().contiguous(), heads, kv_heads, head_dim, eps,
        )  # fmt: skip

    @classmethod
    def build(cls, layers: Sequence[OWQLinear], *args) -> DecodeStack | None:
        """The stack, or None where the module cannot be built or a layer does not qualify."""
        ops = [operands(layer) for layer in layers]
        if any(op is None for op in ops):
            return None
        module = load()
        if module is None:
            return None
        try:
            return cls(module, layers, ops, *args)
        except (RuntimeError, TypeError) as e:  # a shape the step refuses, an older module
            log.warning("fused CPU decode step refused this model (%s): eager blocks", e)
            return None

    def step(self, x: torch.Tensor, positions: torch.Tensor, cache_rows: torch.Tensor, k, v,
             slots):  # fmt: skip
        """x [B, E] fp32 -> [B, E] after every block, or None (see the class): each row one
        token at positions[b] of cache row cache_rows[b] (long [B] both), with its adapter slot
        (long [B], or None: the base)."""
        tables = []
        for layer, plan in zip(self.layers, self.plans, strict=True):
            if layer.cpu is not plan or layer.trainable is not None or layer.force_reference:
                if not self.stale:
                    log.warning("a layer's CPU plan changed: decode runs the eager blocks "
                                "until the runtime is prepared again")  # fmt: skip
                self.stale = True
                return None
            tables.append(layer.weak_table)
        slots = _none() if slots is None else slots
        return self.stack.step(x, positions.reshape(-1), cache_rows, k, v, tables, slots)
