"""Calibration windows: `nsamples` random windows of `seqlen` tokens from one text, seeded.

Two samplers of the window offsets: `torch` (ours: one `torch.randint` draw over every possible
start) and `python` (the GPTQ/OWQ reference scripts' draw: Python's `random` seeded, then
`randint(0, N - seqlen - 1)` per window, so the same seed picks the same windows as those scripts
on the same token stream). Knows a tokenizer's call signature and nothing about models or
quantization.
"""

from __future__ import annotations

import random

import torch


def window_starts(total: int, nsamples: int, seqlen: int, seed: int, sampler: str) -> list[int]:
    """Offsets of `nsamples` windows of `seqlen` tokens in a text of `total` tokens."""
    if sampler == "torch":
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, total - seqlen + 1, (nsamples,), generator=gen).tolist()
    if sampler == "python":
        if total < seqlen + 1:  # the reference draws from [0, N - seqlen - 1]
            raise ValueError(
                f"calibration text has {total} tokens; --sampler python needs at least "
                f"seqlen + 1 = {seqlen + 1}"
            )
        rng = random.Random(seed)
        return [rng.randint(0, total - seqlen - 1) for _ in range(nsamples)]
    raise ValueError(f"--sampler must be torch or python, got {sampler!r}")


def calibration_windows(
    ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0, sampler: str = "torch"
) -> torch.Tensor:
    """ids: [N] token ids -> [nsamples, seqlen] windows at seeded random offsets."""
    if ids.numel() < seqlen:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}"
        )
    starts = window_starts(ids.numel(), nsamples, seqlen, seed, sampler)
    return torch.stack([ids[s : s + seqlen] for s in starts])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one [N] int64 tensor of token ids."""
    return torch.tensor(tokenizer(text).input_ids, dtype=torch.long)
