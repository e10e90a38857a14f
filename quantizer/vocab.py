"""Quantize the vocabulary table: the LM head, and with it a tied (or an untied) token embedding.

The head W [V, D] is quantized like a linear layer (`layer.gptq_linear`, a row per token, groups
along D, optional fp16 weak columns over D) on the Hessian of its own input: the final norm's
output on the calibration windows after the quantized blocks. Before that, the most salient rows
are chosen and kept whole in fp16 (protected rows): by λ-weighted quantization error
Σ_j λ_j·(W_rj − Q(W)_rj)² on the table's own grid (`error`, the row-wise twin of OWQ's column
sensitivity), or by how often the token occurs in the calibration text (`frequency`). A tied
table becomes one `OWQVocab` used by both ends (`TiedEmbedding`); an untied embedding is
quantized with the same bits on its own min-max/searched grid, protecting its most frequent
tokens. Knows the `Family` table and the layer quantizer; nothing about files or the CLI.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from owq.kernels.families import Family, linear_weight, set_module, vocab_tables
from owq.kernels.grid import fake_quantize
from owq.kernels.owq_vocab import OWQEmbedding, OWQVocab, TiedEmbedding
from owq.kernels.packing import group_index
from owq.threads import single_thread

from .hessian import HessianAccumulator
from .layer import gptq_linear, rtn_linear
from .search import fit_group_params
from .settings import QuantizeSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VocabRecord:
    name: str
    rows: int
    dim: int
    bits: int
    group_size: int
    protected_rows: int
    weak_columns: int
    rel_error: float | None
    tied: bool
    seconds: float


def head_inputs(model: nn.Module, family: Family, hidden: torch.Tensor) -> torch.Tensor:
    """The head's input for the last block's outputs hidden [N, S, E]: final norm, then OPT's
    project_out where the model has one."""
    x = model.get_submodule(family.final_norm)(hidden)
    if family.project_out is not None:
        try:
            x = model.get_submodule(family.project_out)(x)
        except AttributeError:  # this model has no projection
            pass
    return x


def token_counts(windows: torch.Tensor, vocab: int) -> torch.Tensor:
    """How often each token occurs in the calibration windows (as input or as target); [V]."""
    return torch.bincount(windows.reshape(-1), minlength=vocab)[:vocab].to(torch.float32)


def row_saliency(
    W: torch.Tensor, lam: torch.Tensor, s: QuantizeSettings, counts: torch.Tensor | None
) -> torch.Tensor:
    """[V] the score protected rows are chosen by: λ-weighted rounding error of each row on the
    table's own grid (`error`), or the token's calibration frequency (`frequency`)."""
    if s.head_protect_by == "frequency" and counts is not None:
        return counts
    scale, zero = fit_group_params(W, s.wbits, s.groupsize, s.sym, bool(s.search), lam)
    g = group_index(W.shape[1], s.groupsize)
    err = W - fake_quantize(W, scale[g].t(), zero[g].t(), s.wbits)
    return (err.square() * lam).sum(1)


def top_rows(score: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (sorted) of the `count` highest-scoring rows."""
    order = torch.sort(score, descending=True, stable=True).indices
    return torch.sort(order[:count]).values


def _as_vocab(cls, res, s: QuantizeSettings) -> OWQVocab:
    return cls.from_codes(
        res.codes, res.scales, res.zeros, s.wbits, s.groupsize, res.weak_idx, res.oweight
    )


def _quantize_head(W, stats: HeadStats, settings: QuantizeSettings, rows: int, given=None):
    """(table, relative output error) of the head with `rows` protected rows, or the rows
    `given` (a plan's)."""
    s, H = settings.for_head(), stats.hessian
    protected = given
    if protected is None:
        score = row_saliency(W, torch.diag(H), s, stats.counts)
        if stats.fisher is not None and s.head_protect_by == "error":
            score = score * stats.fisher  # the loss-unit score the whole budget was planned with
        protected = top_rows(score, rows)
    found = {}

    def quantize(rows: torch.Tensor) -> OWQVocab:
        found["res"] = gptq_linear(rows, H, s.head_weak_columns, s)
        return _as_vocab(OWQVocab, found["res"], s)

    table = OWQVocab.from_rows(quantize, W, protected)
    return table, found["res"].rel_error


def _quantize_embedding(W, settings: QuantizeSettings, counts, rows: int, given=None):
    s = settings.for_head()
    protected = top_rows(counts, rows) if given is None else given
    return OWQEmbedding.from_rows(lambda r: _as_vocab(OWQEmbedding, rtn_linear(r, s), s), W,
                                  protected)  # fmt: skip


@dataclass(frozen=True)
class HeadStats:
    """What the head is quantized from: the Hessian of its input and the token counts."""

    hessian: torch.Tensor  # [D, D]
    counts: torch.Tensor  # [V]
    fisher: torch.Tensor | None = None  # [V] per-row Fisher of the logits (`fisher.py`), if any


def head_stats(
    model: nn.Module,
    family: Family,
    hidden: torch.Tensor,
    windows: torch.Tensor,
    fisher: torch.Tensor | None = None,
) -> HeadStats:
    """hidden: [N, S, E] outputs of the last (quantized) block on the windows [N, S]."""
    head = model.get_submodule(family.head)
    acc = HessianAccumulator(linear_weight(head).shape[1])
    with torch.no_grad():
        for chunk in hidden.split(8):
            acc.add(head_inputs(model, family, chunk))
    return HeadStats(acc.hessian(), token_counts(windows, linear_weight(head).shape[0]), fisher)


def quantize_vocab(
    model: nn.Module,
    family: Family,
    settings: QuantizeSettings,
    stats: HeadStats | None,
    rows: int | None = None,
    given: dict[str, torch.Tensor] | None = None,
) -> VocabRecord | None:
    """Swap the model's head (and embedding) for quantized tables, in place; None at 16 bits.
    `rows` protected rows per table (default: the `--head-protect` fraction of the vocabulary);
    `given`: table path -> the protected rows to keep (a plan's), instead of choosing them."""
    if settings.head_bits == 16:
        return None
    if stats is None:
        raise ValueError("--head-bits needs calibration data (a method other than rtn)")
    start = time.perf_counter()
    head, embed = model.get_submodule(family.head), model.get_submodule(family.embed)
    tied = len(vocab_tables(model, family)) == 1
    W = linear_weight(head).to(torch.float32)
    rows = round(settings.head_protect * W.shape[0]) if rows is None else rows
    given = given or {}
    with single_thread():
        table, rel = _quantize_head(W, stats, settings, rows, given.get(family.head))
        set_module(model, family.head, table)
        if tied:
            set_module(model, family.embed, TiedEmbedding(table))
        else:
            embedding = _quantize_embedding(
                embed.weight.float(), settings, stats.counts, rows, given.get(family.embed)
            )
            set_module(model, family.embed, embedding)
    seconds = time.perf_counter() - start
    log.info(
        "head %d x %d quantized to %d bits in %.1fs (%d protected rows, %d weak columns)",
        *W.shape, settings.head_bits, seconds, table.num_protected, table.num_weak,
    )  # fmt: skip
    return VocabRecord(
        family.head, W.shape[0], W.shape[1], settings.head_bits, settings.head_groupsize,
        table.num_protected, table.num_weak, rel, tied, seconds,
    )  # fmt: skip
