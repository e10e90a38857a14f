"""Loss-unit sensitivities for ranking weak columns and protected rows across layers.

OWQ's sensitivity of column j, λ_j·‖ΔW_:,j‖², measures a layer's output error, which is not
comparable across layers: a unit of error in the last blocks' MLP outputs (large activations)
and in an early attention projection move the loss by very different amounts, which is why a
global ranking by it sent the whole budget to the last down_proj. One backward pass of the float
model weights each output channel o of each linear by the empirical Fisher
f_o = E_t[(∂L/∂y_t,o)²] (L the summed next-token loss), so that with λ = diag(H) = 2·E[x²]

    Δloss ≈ ¼ Σ_o f_o Σ_j λ_j ΔW_oj²,
    column score λ_j·Σ_o f_o ΔW_oj²,   row score f_o·Σ_j λ_j ΔW_oj²,

in one unit for every linear, the LM head's columns and the head's rows (vocabulary tokens).
Knows the `Family` table; pure statistics, nothing about files or the CLI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from owq.kernels.families import Family

log = logging.getLogger(__name__)


@dataclass
class ChannelStats:
    """Per-layer statistics of one pass: λ = 2·E[x_j²] over inputs, f = E[g_o²] over outputs."""

    lam: torch.Tensor  # [in]
    fisher: torch.Tensor  # [out]


class _Accumulator:
    def __init__(self, in_features: int, out_features: int):
        self.x2 = torch.zeros(in_features, dtype=torch.float64)
        self.g2 = torch.zeros(out_features, dtype=torch.float64)
        self.tokens = 0

    def add_input(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        self.x2 += rows.square().sum(0).double()
        self.tokens += rows.shape[0]

    def add_grad(self, g: torch.Tensor) -> None:
        self.g2 += g.detach().reshape(-1, g.shape[-1]).float().square().sum(0).double()

    def stats(self) -> ChannelStats:
        n = max(self.tokens, 1)
        return ChannelStats((self.x2 * 2 / n).float(), (self.g2 / n).float())


def _hook(module: nn.Module, acc: _Accumulator) -> list:
    def pre(_module, args):
        acc.add_input(args[0])

    def post(_module, _args, out):
        if out.requires_grad:
            out.register_hook(acc.add_grad)

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def linear_names(model: nn.Module, family: Family) -> list[str]:
    blocks = len(model.get_submodule(family.blocks))
    names = [f"{family.blocks}.{i}.{n}" for i in range(blocks) for n in family.linears]
    return [*names, family.head]


def fisher_pass(
    model: nn.Module, family: Family, windows: torch.Tensor, batch: int = 2, progress: bool = True
) -> dict[str, ChannelStats]:
    """λ and f of every linear of the blocks and of the head, from the float model on `windows`
    [N, S] (summed next-token loss; parameters get no gradient). Runs outside inference mode
    (the quantizer's) since it needs a graph."""
    with torch.inference_mode(False), torch.enable_grad():
        return _pass(model, family, windows.clone(), batch, progress)


def _pass(model, family, windows, batch: int, progress: bool) -> dict[str, ChannelStats]:
    from owq.kernels.families import linear_shape

    accs, handles = {}, []
    for name in linear_names(model, family):
        module = model.get_submodule(name)
        accs[name] = _Accumulator(*linear_shape(module))
        handles += _hook(module, accs[name])
    embed = model.get_input_embeddings()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for chunk in tqdm(windows.split(batch), desc="fisher pass", disable=not progress):
            inputs = embed(chunk).detach().requires_grad_(True)  # the graph, no param grads
            logits = model(inputs_embeds=inputs, use_cache=False).logits[:, :-1]
            flat = logits.reshape(-1, logits.shape[-1]).float()
            F.cross_entropy(flat, chunk[:, 1:].reshape(-1), reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
    log.info("fisher pass over %d windows of %d tokens", *windows.shape)
    return {name: acc.stats() for name, acc in accs.items()}
