"""Quantized vocabulary tables: the LM head and the token embedding as low-bit codes.

A table W [V, D] (a row per token) is stored exactly like a linear layer with out = V
(`OWQLinear`: codes packed along D, per-row or grouped scales, fp16 weak columns over D), plus
protected rows: the most salient tokens' rows kept whole in fp16 (`protected_weight` [P, D] at
`protected_idx` [P]); their codes dequantize to exactly 0 and their weak columns are 0. As the
head (`OWQVocab.forward`) it computes logits = x @ Wᵀ through the layer's kernels (the 4-bit CPU
kernel at decode, the CUDA GEMV) with the protected rows as a small fp16 product; as an embedding
(`lookup`) it dequantizes only the rows looked up. A tied table is one set of tensors used both
ways (`TiedEmbedding` refers to the head without owning it; `OWQEmbedding` owns an untied
one). Knows the packed layout and `OWQLinear`; nothing about models, files or requests.
"""

from __future__ import annotations

import torch
from torch import nn

from .owq_linear import OWQLinear
from .packing import unpack_codes, unpack_zeros
from .types import index_problem


class OWQVocab(OWQLinear):
    """A vocabulary table [V, D] as a quantized linear (in = D, out = V) with protected rows."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = -1,
                 num_weak: int = 0, bias: bool = False, num_slots: int = 0, device=None,
                 num_protected: int = 0):  # fmt: skip
        super().__init__(in_features, out_features, bits, group_size, num_weak, bias, num_slots,
                         device)  # fmt: skip
        kw = {"device": device}
        self.register_buffer("protected_idx", torch.zeros(num_protected, dtype=torch.int32, **kw))
        self.register_buffer(
            "protected_weight", torch.zeros(num_protected, in_features, dtype=torch.float16, **kw)
        )
        self._zeros: torch.Tensor | None = None  # unpacked zero points [groups, V] for lookups

    @property
    def num_protected(self) -> int:
        return self.protected_idx.numel()

    @classmethod
    def from_rows(
        cls,
        quantize,
        weight: torch.Tensor,
        protected_idx: torch.Tensor | None = None,
    ) -> OWQVocab:
        """A table from float rows weight [V, D]: `quantize(rows)` builds the OWQVocab of the
        table with the protected rows zeroed (so their codes are the zero point and their weak
        columns 0), then those rows are kept whole in fp16."""
        pidx = torch.empty(0, dtype=torch.long) if protected_idx is None else protected_idx
        pidx = torch.sort(pidx.long().cpu()).values
        rows = weight.detach().float().cpu().clone()
        rows[pidx] = 0.0
        layer = quantize(rows)
        layer.protected_idx = pidx.to(torch.int32)
        layer.protected_weight = weight.detach().cpu()[pidx].to(torch.float16).contiguous()
        return layer

    @classmethod
    def from_float_rows(cls, weight, bits, group_size=-1, outlier_idx=None, protected_idx=None,
                        sym=False) -> OWQVocab:  # fmt: skip
        """Round-to-nearest table (min-max grid) with weak columns and protected rows."""
        quantize = lambda rows: cls.from_float(rows, bits, group_size, outlier_idx, None, sym)  # noqa: E731
        return cls.from_rows(quantize, weight, protected_idx)

    @staticmethod
    def stored_sizes(state: dict) -> dict:
        p = state["protected_idx"].numel() if "protected_idx" in state else 0
        return {**OWQLinear.stored_sizes(state), "num_protected": p}

    def _load_from_state_dict(self, state, prefix, metadata, strict, missing, unexpected, errors):
        super()._load_from_state_dict(state, prefix, metadata, strict, missing, unexpected, errors)
        self._zeros = None
        rows = self.protected_idx.long()
        ok = index_problem(rows, self.out_features) is None
        if not ok or tuple(self.protected_weight.shape) != (rows.numel(), self.in_features):
            shape = f"[{self.out_features}, {self.in_features}]"
            errors.append(f"{prefix}protected rows: not sorted unique rows of a table {shape}")

    def forward(
        self, x: torch.Tensor, slots: torch.Tensor | None = None, fast: bool = False
    ) -> torch.Tensor:
        """Logits x [..., D] -> [..., V] in x's dtype (slots: the head takes no adapters). Every
        step may take the fast kernel of the layer's plan, prefill too: the head's logits are
        wanted for a row or few, and a dense copy of the whole table would cost more than them."""
        return self.protected_product(x, super().forward(x, None, True))

    def protected_product(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [..., V] from the layer's kernels, with the protected rows' logits set from their
        fp16 rows (the kernels give 0 there): x [..., D]. In place; returns y."""
        if self.num_protected:
            y[..., self.protected_idx.long()] = x @ self.protected_weight.to(x.dtype).t()
        return y

    def _zero_points(self) -> torch.Tensor:
        if self._zeros is None or self._zeros.device != self.qzeros.device:
            zeros = unpack_zeros(self.qzeros, self.bits, self.out_features)
            self._zeros = zeros.to(torch.int16)  # [groups, V]
        return self._zeros

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows of the table for token ids [...] -> [..., D] in `dtype`; each distinct row is
        dequantized once and nothing else is."""
        uniq, inverse = torch.unique(ids.reshape(-1).long(), return_inverse=True)
        codes = unpack_codes(self.qweight[:, uniq], self.bits)  # [D, n]
        g = self.packed.group_index()
        zeros = self._zero_points()[:, uniq][g]  # [D, n]
        rows = (codes - zeros).to(torch.float32) * self.scales[:, uniq].float()[g]
        if self.num_weak:
            rows[self.outlier_idx.long()] = self.weak_table[0][:, uniq].float()
        if self.num_protected:
            hit = torch.isin(uniq, self.protected_idx.long())
            if bool(hit.any()):
                where = torch.searchsorted(self.protected_idx.long(), uniq[hit])
                rows[:, hit] = self.protected_weight[where].float().t()
        return rows.t().to(dtype)[inverse].view(*ids.shape, self.in_features)

    def dense_table(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole table [V, D] as it computes (for tests and offline checks)."""
        return self.lookup(torch.arange(self.out_features, device=self.qweight.device), dtype)


class OWQEmbedding(OWQVocab):
    """A token embedding that owns its quantized table (an untied model): forward(ids) -> rows
    in `dtype` (the model's compute dtype)."""

    dtype = torch.float32

    def forward(self, ids: torch.Tensor, *_, **__) -> torch.Tensor:
        return self.lookup(ids, self.dtype)


class TiedEmbedding(nn.Module):
    """The token embedding of a tied table: the head's tensors looked up. It refers to the head
    without owning it, so the state dict holds the table once, under the head."""

    def __init__(self, head: OWQVocab, dtype: torch.dtype = torch.float32):
        super().__init__()
        object.__setattr__(self, "head", head)  # not a submodule: no second state entry
        self.dtype = dtype

    @property
    def num_embeddings(self) -> int:
        return self.head.out_features

    @property
    def embedding_dim(self) -> int:
        return self.head.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head.lookup(ids, self.dtype)
