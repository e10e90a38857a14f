"""Calibration windows: `nsamples` random windows of `seqlen` tokens from one text, seeded.

Knows a tokenizer's call signature and nothing about models or quantization.
"""

from __future__ import annotations

import torch


def calibration_windows(
    ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """ids: [N] token ids -> [nsamples, seqlen] windows at seeded random offsets."""
    last_start = ids.numel() - seqlen
    if last_start < 0:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, last_start + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one [N] int64 tensor of token ids."""
    return torch.tensor(tokenizer(text).input_ids, dtype=torch.long)
