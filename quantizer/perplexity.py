"""Perplexity over non-overlapping windows of `seqlen` tokens (the paper's evaluation).

Knows a causal LM's forward (`model(ids).logits`) and nothing about how it was quantized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    tokens: int  # predicted tokens
    windows: int


def windows_of(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """ids: [N] -> [W, seqlen] non-overlapping windows; ValueError if the text is too short."""
    count = ids.numel() // seqlen
    if count == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seqlen].reshape(count, seqlen)


@torch.no_grad()
def perplexity(
    model,
    ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    batch: int = 4,
    progress: bool = True,
    **forward_kwargs,
) -> Perplexity:
    """exp(mean next-token NLL) over the windows; each window is scored independently."""
    windows = windows_of(ids, seqlen, max_windows)
    nll, tokens = 0.0, 0
    for start in tqdm(range(0, len(windows), batch), desc="perplexity", disable=not progress):
        chunk = windows[start : start + batch]  # [b, seqlen]
        logits = model(chunk, **forward_kwargs).logits[:, :-1].float()  # [b, seqlen-1, V]
        targets = chunk[:, 1:]
        nll += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        tokens += targets.numel()
    return Perplexity(math.exp(nll / tokens), tokens, len(windows))
