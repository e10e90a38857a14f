"""Weak-column budgets: the paper's Appendix D.2 numbers and the global ranking's budget."""

from __future__ import annotations

import torch

from owq.quantizer.allocation import (
    LayerShape,
    fp16_elements,
    global_allocation,
    paper_bits,
    uniform_fixed,
    uniform_from_target,
)


def opt_block_shapes(d: int, blocks: int = 1) -> list[LayerShape]:
    shapes = []
    for b in range(blocks):
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.append(LayerShape(f"{b}.{name}", b, d, d))
        shapes.append(LayerShape(f"{b}.fc1", b, d, 4 * d))
        shapes.append(LayerShape(f"{b}.fc2", b, 4 * d, d))
    return shapes


def test_uniform_reproduces_the_paper_for_opt_6_7b():
    d = 4096  # OPT-6.7B
    shapes = opt_block_shapes(d)
    ks = uniform_from_target(shapes, wbits=3, target_bits=3.01)
    # paper: "the weak columns of the key layers ... (0.15% columns of the key weight matrix)"
    assert ks["0.k_proj"] == round(12 * 0.01 / 13 / 6 * d) == 6
    assert round(100 * ks["0.k_proj"] / d, 2) == 0.15
    # r = 12 (t - w) / (16 - w); each linear holds about r d² / 6 fp16 elements
    per_layer = [ks[s.name] * s.out_features for s in shapes]
    target = 12 * 0.01 / 13 * d * d / 6
    assert all(abs(e - target) <= 0.5 * max(s.out_features for s in shapes) for e in per_layer)
    assert abs(paper_bits(shapes, ks, 3) - 3.01) < 0.002
    assert abs(paper_bits(shapes, uniform_from_target(shapes, 3, 3.1), 3) - 3.1) < 0.002


def test_uniform_handles_gqa_shapes_and_clamps():
    shapes = [
        LayerShape("q", 0, 576, 576),
        LayerShape("k", 0, 576, 192),
        LayerShape("down", 0, 1536, 576),
    ]
    ks = uniform_from_target(shapes, 3, 3.05)
    assert ks["k"] == 3 * ks["q"] or abs(ks["k"] * 192 - ks["q"] * 576) <= 576
    assert uniform_fixed(shapes, 8) == {"q": 8, "k": 8, "down": 8}
    assert uniform_fixed([LayerShape("tiny", 0, 4, 4)], 8) == {"tiny": 4}


def test_global_spends_the_same_budget_on_the_most_sensitive_columns():
    shapes = opt_block_shapes(64, blocks=2)
    uniform = uniform_from_target(shapes, 3, 3.1)
    budget = fp16_elements(shapes, uniform)
    gen = torch.Generator().manual_seed(0)
    sens = {s.name: torch.rand(s.in_features, generator=gen) for s in shapes}
    sens["1.k_proj"][:5] = 1e6  # a few very sensitive columns in one layer
    ks = global_allocation(shapes, sens, budget)
    spent = fp16_elements(shapes, ks)
    assert budget - max(s.out_features for s in shapes) < spent <= budget
    assert ks["1.k_proj"] >= 5
    assert ks != uniform
