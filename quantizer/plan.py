"""The weak-column plan: k for every quantized linear, before the block-by-block pass starts.

`uniform` needs only the layer shapes (Appendix D.2). `global` needs sensitivities of every column
of every layer before the first layer is quantized, so it makes one cheap first pass: the *float*
model on a subset of the calibration windows (at most GLOBAL_WINDOWS) collecting only
λ = diag(H) per linear, then sensitivity_j = λ_j·‖ΔW_:,j‖² with each layer's own grid on its float
weights. The honest caveat: in the real pass, layers after block 0 see inputs of the quantized
model, so their λ differ a little from the float λ used for ranking; only the *count* k per layer
comes from this pass, the columns themselves are re-chosen with the real H. Knows the `Family`
table and the maths modules; nothing about files or the CLI.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm import tqdm

from owq.kernels.families import Family, blocks_of, linear_shape, linear_weight

from .allocation import (
    LayerShape,
    fp16_elements,
    global_allocation,
    uniform_fixed,
    uniform_from_target,
)
from .capture import BlockInputs, capture_block_inputs, run_block_batched
from .driver import single_thread
from .hessian import DiagonalAccumulator
from .settings import QuantizeSettings
from .weak_columns import column_sensitivity

log = logging.getLogger(__name__)

GLOBAL_WINDOWS = 32


def layer_shapes(model: nn.Module, family: Family) -> list[LayerShape]:
    shapes = []
    for i, block in enumerate(blocks_of(model, family)):
        for name in family.linears:
            in_f, out_f = linear_shape(block.get_submodule(name))
            shapes.append(LayerShape(f"{family.blocks}.{i}.{name}", i, in_f, out_f))
    return shapes


def uniform_plan(shapes: list[LayerShape], settings: QuantizeSettings) -> dict[str, int]:
    if settings.method != "owq":
        return {s.name: 0 for s in shapes}
    if settings.weak_columns is not None:
        return uniform_fixed(shapes, settings.weak_columns)
    return uniform_from_target(shapes, settings.wbits, settings.target_bits)


def float_diagonals(
    model: nn.Module, family: Family, windows: torch.Tensor, batch_size: int, progress: bool
) -> dict[str, torch.Tensor]:
    """λ = diag(H) of every linear, from the float model's own activations."""
    inputs: BlockInputs = capture_block_inputs(model, family, windows, batch_size)
    diagonals = {}
    blocks = blocks_of(model, family)
    for i in tqdm(range(len(blocks)), desc="sensitivity pass", disable=not progress):
        accs, handles = {}, []
        for name in family.linears:
            module = blocks[i].get_submodule(name)
            accs[name] = DiagonalAccumulator(linear_shape(module)[0])
            hook = lambda _m, args, acc=accs[name]: acc.add(args[0])  # noqa: E731
            handles.append(module.register_forward_pre_hook(hook))
        try:
            inputs.hidden = run_block_batched(blocks[i], inputs, batch_size)
        finally:
            for h in handles:
                h.remove()
        for name, acc in accs.items():
            diagonals[f"{family.blocks}.{i}.{name}"] = acc.diagonal()
    return diagonals


def global_plan(
    model: nn.Module,
    family: Family,
    shapes: list[LayerShape],
    settings: QuantizeSettings,
    windows: torch.Tensor,
    progress: bool = True,
) -> dict[str, int]:
    """The uniform plan's fp16 element budget, spent on the globally most sensitive columns."""
    budget = fp16_elements(shapes, uniform_plan(shapes, settings))
    diagonals = float_diagonals(
        model, family, windows[:GLOBAL_WINDOWS], settings.batch_size, progress
    )
    sensitivity = {}
    with single_thread():
        for s in shapes:
            W = linear_weight(model.get_submodule(s.name)).to(torch.float32)
            sensitivity[s.name] = column_sensitivity(
                W, diagonals[s.name], settings.wbits, settings.groupsize, settings.sym,
                bool(settings.search),
            )  # fmt: skip
    ks = global_allocation(shapes, sensitivity, budget)
    log.info(
        "global allocation: %d fp16 elements (uniform budget %d)", fp16_elements(shapes, ks), budget
    )
    return ks


def weak_column_plan(
    model: nn.Module,
    family: Family,
    settings: QuantizeSettings,
    windows: torch.Tensor | None,
    progress: bool = True,
) -> dict[str, int]:
    shapes = layer_shapes(model, family)
    if settings.method == "owq" and settings.allocation == "global":
        return global_plan(model, family, shapes, settings, windows, progress)
    return uniform_plan(shapes, settings)
