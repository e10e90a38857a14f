"""How many weak columns k each linear keeps, for a target average bit-width.

`uniform` is the paper's Appendix D.2: a block keeps a fraction (t − w)/(16 − w) of its weight
elements in fp16 (r·d² of 12d² for OPT), split evenly so that every linear of the block keeps
about the same number of fp16 elements: k_l = round(E_block / L / out_l). `global` ranks every
column of every layer by sensitivity per fp16 element (λ_j·‖ΔW_:,j‖² / out_l) and fills the same
total element budget. Pure arithmetic on shapes and sensitivity vectors; knows no models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerShape:
    name: str
    block: int
    in_features: int
    out_features: int


def fp16_fraction(target_bits: float, wbits: int) -> float:
    """(t − w)/(16 − w) = r/12: the share of weight elements kept in fp16 (Appendix D.2)."""
    return (target_bits - wbits) / (16 - wbits)


def uniform_from_target(shapes: list[LayerShape], wbits: int, target_bits: float) -> dict[str, int]:
    """Appendix D.2: k per layer so each linear of a block holds E_block / L fp16 elements."""
    fraction = fp16_fraction(target_bits, wbits)
    blocks: dict[int, list[LayerShape]] = {}
    for shape in shapes:
        blocks.setdefault(shape.block, []).append(shape)
    ks = {}
    for layers in blocks.values():
        elements = fraction * sum(s.in_features * s.out_features for s in layers)
        per_layer = elements / len(layers)
        for s in layers:
            ks[s.name] = min(s.in_features, round(per_layer / s.out_features))
    return ks


def uniform_fixed(shapes: list[LayerShape], k: int) -> dict[str, int]:
    """The same k in every layer (--weak-columns K, the WCT setting r = k)."""
    return {s.name: min(k, s.in_features) for s in shapes}


def fp16_elements(shapes: list[LayerShape], ks: dict[str, int]) -> int:
    return sum(ks[s.name] * s.out_features for s in shapes)


def global_allocation(
    shapes: list[LayerShape], sensitivity: dict[str, torch.Tensor], budget: int
) -> dict[str, int]:
    """k per layer from one ranking of all columns by sensitivity per fp16 element.

    Greedy: take columns in order of sensitivity_j / out_l while they fit in `budget` fp16
    elements (a column that does not fit is skipped, smaller ones may still fit).
    """
    names, scores, costs = [], [], []
    for i, s in enumerate(shapes):
        sens = sensitivity[s.name].to(torch.float64)
        names.append(torch.full((sens.numel(),), i, dtype=torch.long))
        scores.append(sens / s.out_features)
        costs.append(torch.full((sens.numel(),), s.out_features, dtype=torch.long))
    layer_of, score, cost = torch.cat(names), torch.cat(scores), torch.cat(costs)
    order = torch.sort(score, descending=True, stable=True).indices
    counts = [0] * len(shapes)
    left = budget
    for j in order.tolist():
        c = int(cost[j])
        if c <= left:
            counts[int(layer_of[j])] += 1
            left -= c
        if left < min(s.out_features for s in shapes):
            break
    return {s.name: counts[i] for i, s in enumerate(shapes)}


def paper_bits(shapes: list[LayerShape], ks: dict[str, int], wbits: int) -> float:
    """t = w + (16 − w)·(fp16 elements)/(all elements): the paper's effective bit-width."""
    total = sum(s.in_features * s.out_features for s in shapes)
    return wbits + (16 - wbits) * fp16_elements(shapes, ks) / max(total, 1)
