"""Block-by-block driver: calibration inputs flow through the model one decoder block at a time.

Per block: collect H = 2XXᵀ/n for each group of linears that share an input, quantize them, and
run the block with its quantized weights to produce the next block's inputs, so every layer is
calibrated on the outputs of the already-quantized model before it. Memory stays O(one block +
activations). Two schedules:

- default (the paper's OWQ/GPTQ): one pass with the float block collects every group's H (it stops
  before the last linear's matmul), then all linears are quantized, then one pass with the
  quantized block produces the outputs;
- true-sequential: a single pass over all windows at once; when the forward reaches a group, a
  pre-hook computes its H from the actual (already partly quantized) inputs, quantizes the group
  in place and lets the forward continue, so H of later groups sees the quantized earlier ones.

Knows the `Family` table and the layer quantizer's API; nothing about files or the CLI.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from owq.kernels.families import Family, blocks_of, linear_weight, set_module
from owq.threads import single_thread

from .capture import BlockInputs, StopForward, run_block, run_block_batched
from .hessian import HessianAccumulator
from .layer import LayerResult, gptq_linear, rtn_linear
from .settings import QuantizeSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeakColumnChoice:
    """k per layer name; `given`: the weak-column indices (int64 [k], sorted) of every layer when
    a plan gives them, else empty (the k most sensitive columns are selected per layer)."""

    counts: dict[str, int]
    given: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerRecord:
    name: str
    kind: str  # e.g. "self_attn.q_proj": the layer type within its block
    in_features: int
    out_features: int
    weak_columns: int
    rel_error: float | None
    gptq_loss: float | None
    seconds: float


def set_weight(module: nn.Module, weight: torch.Tensor, conv1d: bool) -> None:
    """Write an [out, in] weight into an nn.Linear or a (transposed) GPT-2 Conv1D."""
    module.weight.data = (weight.t() if conv1d else weight).contiguous().to(module.weight.dtype)


def _swap_in(block: nn.Module, name: str, res: LayerResult, s: QuantizeSettings) -> None:
    module = block.get_submodule(name)
    bias = module.bias.data if getattr(module, "bias", None) is not None else None
    set_module(block, name, res.to_module(s.wbits, s.groupsize, bias))


def _record(prefix: str, name: str, res: LayerResult) -> LayerRecord:
    out_f, in_f = res.codes.shape
    return LayerRecord(
        f"{prefix}.{name}",
        name,
        in_f,
        out_f,
        int(res.weak_idx.numel()),
        res.rel_error,
        res.gptq_loss,
        res.seconds,
    )


def _quantize_group(
    block: nn.Module,
    prefix: str,
    names: tuple[str, ...],
    H: torch.Tensor,
    weak: WeakColumnChoice,
    settings: QuantizeSettings,
    family: Family,
) -> dict[str, LayerResult]:
    results = {}
    for name in names:
        module = block.get_submodule(name)
        full = f"{prefix}.{name}"
        k = weak.counts.get(full, 0)
        with single_thread():
            res = gptq_linear(linear_weight(module), H, k, settings, weak.given.get(full))
        set_weight(module, res.weight_hat, family.conv1d)
        results[name] = res
        log.debug("%s.%s k=%d rel_error=%.3e", prefix, name, k, res.rel_error)
    return results


def _hessians_float_pass(
    block: nn.Module, inputs: BlockInputs, family: Family, batch_size: int
) -> list[torch.Tensor]:
    """One pass of the float block collecting H per group; stops before the last group's matmul."""
    accs: list[HessianAccumulator | None] = [None] * len(family.groups)
    last_seen: list[torch.Tensor | None] = [None] * len(family.groups)
    handles = []

    def make_hook(g: int):
        def hook(_module, args):
            x = args[0]
            if last_seen[g] is not x:  # the linears of a group share one input tensor
                last_seen[g] = x
                if accs[g] is None:
                    accs[g] = HessianAccumulator(x.shape[-1])
                accs[g].add(x)
            if g == len(family.groups) - 1:
                raise StopForward

        return hook

    for g, names in enumerate(family.groups):
        for name in names:
            handles.append(block.get_submodule(name).register_forward_pre_hook(make_hook(g)))
    try:
        run_block_batched(block, inputs, batch_size)
    finally:
        for h in handles:
            h.remove()
    return [acc.hessian() for acc in accs]


def _quantize_block_parallel(block, prefix, inputs, weak, settings, family) -> dict:
    Hs = _hessians_float_pass(block, inputs, family, settings.batch_size)
    results = {}
    for names, H in zip(family.groups, Hs, strict=True):
        results |= _quantize_group(block, prefix, names, H, weak, settings, family)
    inputs.hidden = run_block_batched(block, inputs, settings.batch_size)
    return results


def _quantize_block_sequential(block, prefix, inputs, weak, settings, family) -> dict:
    """True-sequential in one forward over all windows: each group is quantized when reached."""
    results: dict[str, LayerResult] = {}
    done = [False] * len(family.groups)
    handles = []

    def make_hook(g: int):
        def hook(_module, args):
            if not done[g]:
                acc = HessianAccumulator(args[0].shape[-1])
                acc.add(args[0])
                group = family.groups[g]
                results.update(
                    _quantize_group(block, prefix, group, acc.hessian(), weak, settings, family)
                )
                done[g] = True

        return hook

    for g, names in enumerate(family.groups):
        for name in names:
            handles.append(block.get_submodule(name).register_forward_pre_hook(make_hook(g)))
    try:
        hidden = inputs.hidden
        inputs.hidden = run_block(block, hidden, inputs.call(hidden.shape[0]))
    finally:
        for h in handles:
            h.remove()
    return results


def quantize_blocks(
    model: nn.Module,
    family: Family,
    settings: QuantizeSettings,
    inputs: BlockInputs | None,
    weak: WeakColumnChoice,
    progress: bool = True,
    on_block: Callable[[int], None] | None = None,
) -> list[LayerRecord]:
    """Quantize every linear of every block in place (swapped for OWQLinear); per-layer records."""
    blocks = blocks_of(model, family)
    records: list[LayerRecord] = []
    bar = tqdm(
        range(len(blocks)), desc=f"{settings.method} blocks", unit="block", disable=not progress
    )
    for i in bar:
        start = time.perf_counter()
        block, prefix = blocks[i], f"{family.blocks}.{i}"
        if settings.method == "rtn":
            results = {
                n: rtn_linear(linear_weight(block.get_submodule(n)), settings)
                for n in family.linears
            }
        elif settings.true_sequential:
            results = _quantize_block_sequential(block, prefix, inputs, weak, settings, family)
        else:
            results = _quantize_block_parallel(block, prefix, inputs, weak, settings, family)
        for name in family.linears:
            _swap_in(block, name, results[name], settings)
            records.append(_record(prefix, name, results[name]))
        log.debug("block %d done in %.1fs", i, time.perf_counter() - start)
        if on_block is not None:
            on_block(i)
    return records
