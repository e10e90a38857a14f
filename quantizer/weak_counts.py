"""How many weak columns k every quantized linear keeps, decided before the block-by-block pass.

`uniform` needs only the layer shapes (Appendix D.2). `global` needs sensitivities of every column
of every layer, in one unit, before the first layer is quantized, so it makes one first pass: the
*float* model, forward and backward, on a subset of the calibration windows (at most
GLOBAL_WINDOWS), collecting λ = diag(H) and the Fisher of each output channel per linear
(`fisher.py`); then sensitivity_j = λ_j·Σ_o f_o ΔW_oj² with each layer's own grid on its float
weights. In the real pass layers after block 0 see inputs of the quantized model, so only the
*count* k per layer comes from this pass; the columns themselves are re-chosen with the real H
(or given by a weak-column plan: `kernels.plan`). Knows the `Family` table and the maths modules;
nothing about files or the CLI.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from owq.kernels.families import Family, blocks_of, linear_shape, linear_weight
from owq.threads import single_thread

from .allocation import (
    LayerShape,
    fp16_elements,
    global_allocation,
    uniform_fixed,
    uniform_from_target,
)
from .fisher import fisher_pass
from .settings import QuantizeSettings
from .weak_columns import column_sensitivity

log = logging.getLogger(__name__)

GLOBAL_WINDOWS = 16


def layer_shapes(model: nn.Module, family: Family) -> list[LayerShape]:
    shapes = []
    for i, block in enumerate(blocks_of(model, family)):
        for name in family.linears:
            in_f, out_f = linear_shape(block.get_submodule(name))
            shapes.append(LayerShape(f"{family.blocks}.{i}.{name}", i, in_f, out_f))
    return shapes


def uniform_counts(shapes: list[LayerShape], settings: QuantizeSettings) -> dict[str, int]:
    if settings.method != "owq":
        return {s.name: 0 for s in shapes}
    if settings.weak_columns is not None:
        return uniform_fixed(shapes, settings.weak_columns)
    return uniform_from_target(shapes, settings.wbits, settings.target_bits)


def global_counts(
    model: nn.Module,
    family: Family,
    shapes: list[LayerShape],
    settings: QuantizeSettings,
    windows: torch.Tensor,
    progress: bool = True,
) -> dict[str, int]:
    """The uniform plan's fp16 element budget, spent on the columns that move the loss most per
    fp16 element: Fisher-weighted sensitivities of the float model (`fisher.py`)."""
    budget = fp16_elements(shapes, uniform_counts(shapes, settings))
    stats = fisher_pass(model, family, windows[:GLOBAL_WINDOWS], progress=progress)
    sensitivity = {}
    with single_thread():
        for s in shapes:
            W = linear_weight(model.get_submodule(s.name)).to(torch.float32)
            sensitivity[s.name] = column_sensitivity(
                W, stats[s.name].lam, settings.wbits, settings.groupsize, settings.sym,
                bool(settings.search), stats[s.name].fisher,
            )  # fmt: skip
    ks = global_allocation(shapes, sensitivity, budget)
    log.info(
        "global allocation: %d fp16 elements (uniform budget %d)", fp16_elements(shapes, ks), budget
    )
    return ks


def weak_column_counts(
    model: nn.Module,
    family: Family,
    settings: QuantizeSettings,
    windows: torch.Tensor | None,
    progress: bool = True,
) -> dict[str, int]:
    shapes = layer_shapes(model, family)
    if settings.method == "owq" and settings.allocation == "global":
        return global_counts(model, family, shapes, settings, windows, progress)
    return uniform_counts(shapes, settings)
