"""The token embedding and LM head of a runtime: plain tensors, or quantized tables.

A checkpoint may store the vocabulary table in fp16 (`<embed>.weight`, `<head>.weight`, or one
tied table) or quantized (`kernels.owq_vocab`: `<head>.qweight` ... with protected rows, and for
an untied model `<embed>.qweight` ...). Either way the runtime asks for `embed(ids)` and
`logits(h, which, fast)`; a quantized head runs through the layer kernels (the 4-bit CPU kernel
on every step) and a quantized embedding dequantizes only the rows looked up. Knows tensor
names and kernels; nothing about requests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from owq.kernels.families import Family
from owq.kernels.owq_vocab import OWQEmbedding, OWQVocab, TiedEmbedding

from .weights import Weights


class Vocab(nn.Module):
    def __init__(self, w: Weights, family: Family, config):
        super().__init__()
        self.dtype, self.device = w.dtype, w.device
        head, embed = family.head, family.embed
        if w.has(f"{head}.qweight"):
            self.head = w.table(f"{head}.", OWQVocab)
        else:
            self.head = w.optional(f"{head}.weight")  # None: tied to the embedding
        if w.has(f"{embed}.qweight"):
            self.embedding = w.table(f"{embed}.", OWQEmbedding)
        elif w.has(f"{embed}.weight"):
            self.embedding = w.tensor(f"{embed}.weight")
        elif isinstance(self.head, OWQVocab) and getattr(config, "tie_word_embeddings", True):
            self.embedding = TiedEmbedding(self.head, w.dtype)
        else:
            raise KeyError(f"the checkpoint has no token embedding ({embed})")
        if self.head is None:
            self.head = self.embedding  # a tied fp16 table: one tensor

    @property
    def size(self) -> int:
        head = self.head
        return head.out_features if isinstance(head, OWQVocab) else head.shape[0]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> [B, T, E] in the compute dtype."""
        if isinstance(self.embedding, torch.Tensor):
            return self.embedding[ids]
        return self.embedding(ids)

    def logits(self, h: torch.Tensor, which, fast: bool = False) -> torch.Tensor | None:
        """h: [B, T, D]. which = "all" -> [B, T, V], "last" -> [B, V], "none" -> None, or a long
        tensor [B] of each row's token index -> [B, V] (padded batches)."""
        if isinstance(which, torch.Tensor):
            h = h[torch.arange(h.shape[0], device=h.device), which]
        elif which == "none":
            return None
        elif which == "last":
            h = h[:, -1]
        if isinstance(self.head, OWQVocab):
            return self.head(h, None, fast)
        return F.linear(h, self.head)
