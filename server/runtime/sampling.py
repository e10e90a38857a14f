"""Token choice from logits: greedy, temperature, top-k, top-p, with one seeded generator per
request (the draw of a row depends on its seed and its logits only; the logits themselves are
batch-invariant on the fp32 path, usually but not always on the 4-bit path: see the README),
and log-probabilities with top-N.

Pure functions of tensors and plain numbers; knows nothing about requests, tokenizers or caches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowSampling:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [V] already divided by the temperature; top-k then top-p (nucleus), -inf outside."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above
        drop = before > top_p
        drop[0] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One index from probs [V] by inverse CDF: the first index whose cumulative mass exceeds a
    uniform draw (float64 sums). Zero-probability entries are never chosen. ~25x cheaper than
    `torch.multinomial` on a 49k vocabulary (44 us vs 1.2 ms), which is per-token cost."""
    cdf = torch.cumsum(probs.to(torch.float64), dim=-1)
    total = float(cdf[-1])
    if not total > 0 or total == float("inf"):  # NaN, inf or all zero: no distribution
        raise ValueError(f"cannot sample: the probabilities sum to {total}")
    u = torch.rand(1, generator=generator, dtype=torch.float64) * total
    index = int(torch.searchsorted(cdf, u, right=True))
    if index >= probs.shape[-1]:  # u rounded up to the total: the last token with mass
        index = int(torch.nonzero(probs > 0)[-1])
    return index


def sample_row(logits: torch.Tensor, params: RowSampling, generator: torch.Generator) -> int:
    """logits: [V] float. One draw from the request's own generator (none for greedy)."""
    if params.temperature <= 0.0:
        return int(torch.argmax(logits))
    logits = logits.float().cpu()  # the generator is a CPU one
    scaled = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    return draw(torch.softmax(scaled, dim=-1), generator)


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


@dataclass(frozen=True)
class TokenLogprobs:
    chosen: list[float]  # [B]
    top_ids: list[list[int]]  # [B][N]
    top_values: list[list[float]]  # [B][N]


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, top_n: int) -> TokenLogprobs:
    """logits: [B, V]; chosen: long [B]. Log-softmax of the model's own distribution."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, chosen.view(-1, 1)).view(-1).tolist()
    if top_n <= 0:
        return TokenLogprobs(picked, [[] for _ in picked], [[] for _ in picked])
    top = torch.topk(logp, min(top_n, logp.shape[-1]), dim=-1)
    return TokenLogprobs(picked, top.indices.tolist(), top.values.tolist())
