"""GPTQ/OPTQ (Frantar et al. 2023): column-by-column rounding with inverse-Hessian error feedback.

Blocked (lazy batch updates, block 128) with the Cholesky form of H⁻¹. Columns are processed in
the order given; the trailing `W.shape[1] - n_quant` columns are OWQ's weak columns: never
rounded, they only receive the error compensation (paper: "rearranging the high-precision weak
columns to the end"). Pure tensor maths; knows nothing of layers, models or weak-column choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from owq.kernels.grid import round_to_codes

BLOCK_SIZE = 128
Refit = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (first col, block)


@dataclass
class GPTQResult:
    Q: torch.Tensor  # [out, in] dequantized columns; weak columns hold compensated fp values
    codes: torch.Tensor  # int64 [out, n_quant]
    scale: torch.Tensor  # [out, in] per-column scale actually used (for refit groups)
    zero: torch.Tensor  # [out, in]
    loss: float  # Σ (w - q)² / [H⁻¹]_ii² / 2, GPTQ's own error proxy


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + δI)⁻¹, δ = percdamp·mean(diag H) (GPTQ Alg. 1, line 2)."""
    H = H.clone()
    idx = torch.arange(H.shape[0])
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    n_quant: int,
    percdamp: float = 0.01,
    group_size: int = -1,
    refit: Refit | None = None,
    block_size: int = BLOCK_SIZE,
) -> GPTQResult:
    """OPTQ on W [out, in] with H [in, in], both already in processing order.

    scale, zero: [out, in] grid of every column (static groups). With `refit`, the grid of each
    group of `group_size` columns is instead fit from the current (compensated) weights when the
    group starts (GPTQ's original dynamic groups; needs group_size | block_size).
    """
    W = W.clone().to(torch.float32)
    scale, zero = scale.clone(), zero.clone()
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = damped_inverse_cholesky(H, percdamp)
    out_f = W.shape[0]
    codes = torch.zeros(out_f, n_quant, dtype=torch.int64)
    loss = torch.zeros(out_f)
    for i1 in range(0, n_quant, block_size):
        i2 = min(i1 + block_size, n_quant)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if refit is not None and group_size > 0 and col % group_size == 0:
                s, z = refit(col, W1[:, i : i + group_size])
                scale[:, col : col + group_size] = s[:, None]
                zero[:, col : col + group_size] = z[:, None]
            w, d = W1[:, i], Hinv1[i, i]
            s, z = scale[:, col], zero[:, col]
            c = round_to_codes(w, s, z, bits)
            q = (c - z) * s
            codes[:, col] = c
            err = (w - q) / d
            loss += err.square() / 2
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return GPTQResult(W, codes, scale, zero, float(loss.sum()))
