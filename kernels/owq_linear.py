"""`OWQLinear`: a linear layer stored as packed low-bit codes plus fp16 weak columns.

y = x @ dequant(Q) + x[..., idx] @ O[slot(row)] + bias. The dense part is computed once for the
whole batch; the weak part gathers the k weak inputs and multiplies each row by its own slot's
columns (slot 0 = the base's `oweight`, slot s >= 1 = `adapter_table[s - 1]`). CUDA tensors take
the CuPy kernels when CuPy is importable, everything else the torch twin (`reference`); the CPU
path caches one dequantized dense copy. Knows nothing about model families or files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .grid import minmax_scale_zero, round_to_codes
from .packing import (
    check_layout,
    dequantize,
    num_groups,
    pack_codes,
    pack_zeros,
    unpack_codes,
    unpack_zeros,
)


class OWQLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = -1,
        num_weak: int = 0,
        bias: bool = False,
        num_slots: int = 0,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        check_layout(in_features, out_features, bits, group_size)
        if not 0 <= num_weak <= in_features:
            raise ValueError(f"num_weak={num_weak} must lie in [0, in_features={in_features}]")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = num_groups(in_features, group_size)
        zero_words = -(-out_features // 32) * bits
        kw = {"device": device}
        self.register_buffer(
            "qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, **kw)
        )
        self.register_buffer("scales", torch.ones(groups, out_features, dtype=torch.float16, **kw))
        self.register_buffer("qzeros", torch.zeros(groups, zero_words, dtype=torch.int32, **kw))
        self.register_buffer(
            "outlier_idx", torch.arange(num_weak, dtype=torch.int32, device=device)
        )
        self.oweight = nn.Parameter(torch.zeros(num_weak, out_features, dtype=torch.float16, **kw))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=torch.float16, **kw) if bias else None
        )
        self.register_buffer(
            "adapter_table",
            torch.zeros(num_slots, num_weak, out_features, dtype=torch.float16, **kw),
            persistent=False,
        )
        self.force_reference = False
        self._dense_cache: torch.Tensor | None = None

    @property
    def num_weak(self) -> int:
        return self.outlier_idx.numel()

    @property
    def num_slots(self) -> int:
        """Adapter slots besides slot 0 (the base's own weak columns)."""
        return self.adapter_table.shape[0]

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, weak={self.num_weak}, slots={self.num_slots}"
        )

    # construction -------------------------------------------------------------------------
    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group_size: int = -1,
        outlier_idx: torch.Tensor | None = None,
        oweight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> OWQLinear:
        """Build from unpacked parts in weight space.

        codes: int [out, in]; scales: float [groups, out]; zeros: int [groups, out];
        outlier_idx: int [k] (any order, unique); oweight: float [out, k] columns in the same order
        as outlier_idx (stored sorted as [k, out]). Weak-column codes are replaced by the zero
        point so the dense part is exactly 0 there.
        """
        out_features, in_features = codes.shape
        idx = (
            torch.empty(0, dtype=torch.long)
            if outlier_idx is None
            else outlier_idx.to(torch.long).cpu()
        )
        if idx.numel() != torch.unique(idx).numel():
            raise ValueError("outlier_idx must be unique")
        layer = cls(in_features, out_features, bits, group_size, idx.numel(), bias is not None)
        order = torch.argsort(idx)
        codes = codes.to(torch.int64).cpu().clone()
        zeros = zeros.to(torch.int64).cpu()
        if idx.numel():
            per_group = in_features if group_size == -1 else group_size
            codes[:, idx] = zeros[idx // per_group].t()
            layer.oweight.data = oweight.cpu().t()[order].to(torch.float16).contiguous()
            layer.outlier_idx = idx[order].to(torch.int32)
        layer.qweight = pack_codes(codes.t().contiguous(), bits)
        layer.scales = scales.cpu().to(torch.float16).contiguous()
        layer.qzeros = pack_zeros(zeros, bits)
        if bias is not None:
            layer.bias = bias.detach().cpu().to(torch.float16)
        return layer

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bits: int,
        group_size: int = -1,
        outlier_idx: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        sym: bool = False,
    ) -> OWQLinear:
        """Round-to-nearest with min-max scales; columns in outlier_idx stay fp16.

        weight: float [out, in] (nn.Linear layout). Scales are fit on the non-weak columns only.
        """
        weight = weight.detach().to(torch.float32).cpu()
        out_features, in_features = weight.shape
        check_layout(in_features, out_features, bits, group_size)
        idx = (
            torch.empty(0, dtype=torch.long) if outlier_idx is None else outlier_idx.to(torch.long)
        )
        masked = weight.clone()
        masked[:, idx] = 0.0
        per_group = in_features if group_size == -1 else group_size
        scales, zeros, codes = [], [], []
        for start in range(0, in_features, per_group):
            block = masked[:, start : start + per_group]
            scale, zero = minmax_scale_zero(block, bits, sym)
            codes.append(round_to_codes(block, scale[:, None], zero[:, None], bits))
            scales.append(scale)
            zeros.append(zero)
        return cls.from_codes(
            torch.cat(codes, 1),
            torch.stack(scales),
            torch.stack(zeros).to(torch.int64),
            bits,
            group_size,
            idx,
            weight[:, idx],
            bias,
        )

    # adapter slots ------------------------------------------------------------------------
    def resize_slots(self, num_slots: int) -> None:
        """Reallocate the slot table to `num_slots` adapter slots (all zero)."""
        shape = (num_slots, self.num_weak, self.out_features)
        self.adapter_table = torch.zeros(shape, dtype=torch.float16, device=self.qweight.device)

    def set_slot(self, slot: int, columns: torch.Tensor) -> None:
        """Write an adapter's weak columns [k, out] into slot >= 1, in place (no reallocation)."""
        if not 1 <= slot <= self.num_slots:
            raise ValueError(f"slot {slot} out of range 1..{self.num_slots}")
        if tuple(columns.shape) != (self.num_weak, self.out_features):
            raise ValueError(
                f"adapter columns have shape {tuple(columns.shape)}, "
                f"expected [{self.num_weak}, {self.out_features}]"
            )
        with torch.no_grad():
            self.adapter_table[slot - 1].copy_(columns)

    # compute ------------------------------------------------------------------------------
    def _load_from_state_dict(self, *args, **kwargs):
        self._dense_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def invalidate_cache(self) -> None:
        self._dense_cache = None

    def dense_weight(self, dtype: torch.dtype, cache: bool = True) -> torch.Tensor:
        """Dequantized dense part as [out, in] in `dtype` (weak columns 0); cached on the CPU
        unless `cache` is False (then always a new tensor)."""
        kept = self._dense_cache
        if cache and kept is not None and (kept.dtype, kept.device) == (dtype, self.qweight.device):
            return kept
        w = dequantize(self.qweight, self.scales, self.qzeros, self.bits, self.group_size, dtype)
        w = w.t().contiguous()
        if cache and not w.is_cuda:
            self._dense_cache = w
        return w

    def channel_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(codes int32 [out, in] in [0, 2^bits), zeros int32 [out], scale fp32 [out]) with
        dense part = (codes - zeros[:, None]) * scale[:, None], for a layer with one group
        (per-output-channel scales); None for grouped layers. Weak columns hold their zero."""
        if self.group_size != -1:
            return None
        codes = unpack_codes(self.qweight, self.bits).t().to(torch.int32).contiguous()
        zeros = unpack_zeros(self.qzeros, self.bits, self.out_features)[0].to(torch.int32)
        return codes, zeros, self.scales[0].float()

    def forward(self, x: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, ..., in]; slots: int [B] adapter slot per leading row (None = slot 0)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        if x.is_cuda and not self.force_reference:
            from . import cuda_ops

            if cuda_ops.available():
                return cuda_ops.owq_linear_forward(self, x, slots)
        y = F.linear(x, self.dense_weight(x.dtype))
        if self.num_weak:
            table = self.adapter_table if slots is not None else None
            y = y + reference.weak_columns_product(x, self.outlier_idx, self.oweight, table, slots)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y
