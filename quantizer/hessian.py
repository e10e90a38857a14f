"""The layer Hessian H = 2XXᵀ/n of GPTQ/OWQ, accumulated from layer inputs, and the output error.

Pure tensor maths; knows nothing of models, hooks or files.
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Sums XᵀX over batches of layer inputs; `hessian()` is H = 2XXᵀ/n (paper Eq. 3)."""

    def __init__(self, features: int):
        self.gram = torch.zeros(features, features, dtype=torch.float32)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """x: [..., features] inputs of the layer (any leading shape)."""
        rows = x.reshape(-1, x.shape[-1]).to(torch.float32)  # [n, in]
        self.gram.addmm_(rows.t(), rows)
        self.count += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no calibration inputs reached this layer")
        return self.gram * (2.0 / self.count)


class DiagonalAccumulator:
    """Only λ = diag(H) = 2·mean(x_j²): cheap, for ranking columns across layers."""

    def __init__(self, features: int):
        self.squares = torch.zeros(features, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.squares += rows.square().sum(0).to(torch.float64)
        self.count += rows.shape[0]

    def diagonal(self) -> torch.Tensor:
        return (self.squares * (2.0 / max(self.count, 1))).to(torch.float32)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) = (2/n)·‖WX − ŴX‖²_F: the layer's output error on the calibration inputs."""
    dW = (W - W_hat).to(torch.float32)
    return float(((dW @ H) * dW).sum())


def output_energy(W: torch.Tensor, H: torch.Tensor) -> float:
    """tr(W H Wᵀ) = (2/n)·‖WX‖²_F, the denominator of the relative output error."""
    W = W.to(torch.float32)
    return float(((W @ H) * W).sum())
