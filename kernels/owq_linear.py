"""`OWQLinear`: a linear layer stored as packed low-bit codes plus fp16 weak columns.

y = x @ dequant(Q) + x[..., idx] @ T[slot(row)] + bias. The layer owns one slot table
`weak_table` [S+1, k, out]: slot 0 holds the base's own weak columns (saved as `<layer>.oweight`),
slots 1..S adapter columns written in place between steps. The dense part is computed once for
the whole batch, the weak part per row from its own slot. One dispatch picks the compute:
autograd (weak column tuning, gradients to `x`) → the torch twin; CUDA with CuPy → `cuda_ops`;
otherwise `cpu_ops` with a cached `CpuPlan`. Weak column tuning is a mode of the layer
(`train_weak_columns`): slot 0 becomes a float32 master Parameter while the packed base stays
frozen. Layers that read the same input may be fused into one (`fused.fuse`); each stored layer
is then a `Part` of it. Knows nothing about model families, files or requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import cpu_ops, reference
from .grid import minmax_scale_zero, round_to_codes
from .packing import (
    check_layout,
    group_index,
    num_groups,
    pack_codes,
    pack_zeros,
    stored_layout,
)
from .types import PackedWeight, WeakColumns


@dataclass(frozen=True)
class Part:
    """One stored layer inside a (possibly fused) layer: its output columns and slot-table rows."""

    offset: int  # first output column
    out_features: int
    rows: torch.Tensor  # long [k]: rows of the slot table holding this part's weak columns


class _FrozenDense(torch.autograd.Function):
    """y = x @ dequant(Q)ᵀ; dL/dx = dL/dy @ dequant(Q), fetching the weight again in backward
    (the CPU plan's cached copy, or a fresh dequantization on CUDA) instead of saving it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: OWQLinear) -> torch.Tensor:
        ctx.layer = layer
        return torch.nn.functional.linear(x, layer.dense_weight(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dense_weight(grad.dtype), None


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
        self.register_buffer("outlier_idx", torch.arange(num_weak, dtype=torch.int32, **kw))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=torch.float16, **kw) if bias else None
        )
        table = torch.zeros(num_slots + 1, num_weak, out_features, dtype=torch.float16, **kw)
        self.register_buffer("weak_table", table, persistent=False)
        self.register_parameter("trainable", None)  # WCT mode: float32 master of slot 0
        self.parts = (Part(0, out_features, torch.arange(num_weak)),)
        self.force_reference = False
        self.cpu: cpu_ops.CpuPlan | None = None

    @property
    def num_weak(self) -> int:
        return self.outlier_idx.numel()

    @property
    def num_slots(self) -> int:
        """Adapter slots besides slot 0 (the base's own weak columns)."""
        return self.weak_table.shape[0] - 1

    @property
    def oweight(self) -> torch.Tensor:
        """[k, out]: the base's own weak columns (slot 0), or the float32 master in WCT mode."""
        return self.trainable if self.trainable is not None else self.weak_table[0]

    # the two views below read `_buffers` directly: they are built on every forward, and the
    # module's attribute fallback costs more than the rest of a decode step's bookkeeping
    @property
    def packed(self) -> PackedWeight:
        b = self._buffers
        return PackedWeight(b["qweight"], b["scales"], b["qzeros"], self.bits, self.group_size)

    @property
    def weak(self) -> WeakColumns:
        b = self._buffers
        return WeakColumns(b["outlier_idx"], b["weak_table"])

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
        idx = torch.empty(0, dtype=torch.long) if outlier_idx is None else outlier_idx.long().cpu()
        if idx.numel() != torch.unique(idx).numel():
            raise ValueError("outlier_idx must be unique")
        layer = cls(in_features, out_features, bits, group_size, idx.numel(), bias is not None)
        order = torch.argsort(idx)
        codes = codes.to(torch.int64).cpu().clone()
        zeros = zeros.to(torch.int64).cpu()
        if idx.numel():
            codes[:, idx] = zeros[group_index(in_features, group_size)[idx]].t()
            layer.weak_table[0] = oweight.detach().cpu().t()[order].to(torch.float16)
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
        idx = torch.empty(0, dtype=torch.long) if outlier_idx is None else outlier_idx.long()
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
            torch.cat(codes, 1), torch.stack(scales), torch.stack(zeros).to(torch.int64), bits,
            group_size, idx, weight[:, idx], bias,
        )  # fmt: skip

    @classmethod
    def from_tensors(cls, tensors, prefix: str, num_slots: int = 0) -> OWQLinear:
        """The layer stored under `prefix` (e.g. "model.layers.0.mlp.down_proj.") in a
        checkpoint's tensors; bits and group size follow from the shapes (`stored_layout`), so
        layers of different widths may sit side by side."""
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        in_f, out_f, bits, group_size = stored_layout(
            state["qweight"], state["scales"], state["qzeros"]
        )
        layer = cls(in_f, out_f, bits, group_size, num_slots=num_slots, **cls.stored_sizes(state))
        layer.load_state_dict(state, assign=True)
        return layer

    @staticmethod
    def stored_sizes(state: dict) -> dict:
        """Constructor sizes that only the stored tensors tell (their names without prefix)."""
        k = state["outlier_idx"].numel() if "outlier_idx" in state else 0
        return {"num_weak": k, "bias": "bias" in state}

    # state dict: slot 0 is stored as `oweight` [k, out] fp16 ---------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "trainable", None)
        base = self.oweight
        destination[prefix + "oweight"] = base if keep_vars else base.detach().half()

    def _load_from_state_dict(self, state, prefix, metadata, strict, missing, unexpected, errors):
        super()._load_from_state_dict(state, prefix, metadata, strict, missing, unexpected, errors)
        key = prefix + "oweight"
        if key in unexpected:
            unexpected.remove(key)
        missing[:] = [m for m in missing if m != prefix + "trainable"]
        self.cpu = None
        if key not in state:
            if self.num_weak:
                missing.append(key)
            return
        try:  # a corrupt index would make the kernels read past x: refuse it here, once
            self.weak.check_indices(self.in_features)
        except ValueError as e:
            errors.append(f"{prefix}outlier_idx: {e}")
            return
        value, k = state[key], self.outlier_idx.numel()
        if tuple(value.shape) != (k, self.out_features):
            errors.append(f"{key}: shape {tuple(value.shape)}, expected [{k}, {self.out_features}]")
            return
        table = torch.zeros(
            self.num_slots + 1, k, self.out_features, dtype=self.weak_table.dtype,
            device=value.device,
        )  # fmt: skip
        table[0] = value
        self.weak_table = table
        self.parts = (Part(0, self.out_features, torch.arange(k)),)

    # adapter slots ------------------------------------------------------------------------
    def resize_slots(self, num_slots: int, dtype: torch.dtype | None = None) -> None:
        """Reallocate the slot table for `num_slots` adapter slots (zero), keeping slot 0; `dtype`
        (default: as now) is float16 as stored, what the CUDA kernels and the CPU fast path read."""
        old = self.weak_table
        table = old.new_zeros(num_slots + 1, *old.shape[1:], dtype=dtype or old.dtype)
        table[0] = old[0]
        self.weak_table = table

    def set_slot(self, slot: int, columns: torch.Tensor | None, part: int = 0) -> None:
        """Write one part's adapter columns [k_part, out_part] into slot >= 1, in place (None:
        the base's own columns of that part)."""
        if not 1 <= slot <= self.num_slots:
            raise ValueError(f"slot {slot} out of range 1..{self.num_slots}")
        p = self.parts[part]
        if columns is not None and tuple(columns.shape) != (p.rows.numel(), p.out_features):
            raise ValueError(
                f"adapter columns have shape {tuple(columns.shape)}, "
                f"expected [{p.rows.numel()}, {p.out_features}]"
            )
        rows, cols = p.rows.to(self.weak_table.device), slice(p.offset, p.offset + p.out_features)
        with torch.no_grad():
            base = self.weak_table[0, rows, cols]
            value = base if columns is None else columns.to(self.weak_table.dtype)
            self.weak_table[slot, rows, cols] = value

    # weak column tuning -------------------------------------------------------------------
    def train_weak_columns(self, on: bool = True) -> None:
        """WCT mode: slot 0 becomes a trainable float32 master (`trainable`, the only parameter
        that gets gradients); off writes it back into the slot table rounded to fp16."""
        if on and self.trainable is None:
            self.trainable = nn.Parameter(self.weak_table[0].detach().float().clone())
        elif not on and self.trainable is not None:
            with torch.no_grad():
                self.weak_table[0] = self.trainable.detach().half()
            self.trainable = None

    # compute ------------------------------------------------------------------------------
    def prepare(
        self, dtype: torch.dtype, int4: bool = False, resident: bool = True
    ) -> cpu_ops.CpuPlan:
        """Build (or rebuild) the CPU plan for `dtype`: `int4` adds the 4-bit decode kernel,
        `resident` keeps a dequantized dense copy (else prefill dequantizes per call)."""
        self.cpu = cpu_ops.plan(self.packed, dtype, int4, resident, self.outlier_idx)
        return self.cpu

    def release(self) -> None:
        """Drop the CPU plan (it is rebuilt on the next CPU forward)."""
        self.cpu = None

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized dense part [out, in] in `dtype` (weak rows 0): the CPU plan's resident
        copy where it keeps one (built once), a fresh tensor otherwise."""
        if self.qweight.is_cuda:
            return self.packed.dequantize(dtype).t()
        if self.cpu is None or self.cpu.dtype != dtype:
            self.prepare(dtype, int4=self.cpu is not None and self.cpu.kernel is not None)
        if self.cpu.weight is None:
            return self.packed.dequantize(dtype).t()
        return self.cpu.weight

    def _needs_twin(self, x: torch.Tensor) -> bool:
        """WCT mode (slot 0 is the master, also under no_grad) or autograd to x / the table."""
        if self.trainable is not None:
            return True
        return torch.is_grad_enabled() and (x.requires_grad or self.weak_table.requires_grad)

    def _torch_forward(self, x: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
        """The twin path with autograd to x and the weak columns (never to the packed base)."""
        y = _FrozenDense.apply(x, self)
        if self.num_weak:
            table = self.weak_table
            if self.trainable is not None:
                master = self.trainable
                table = torch.cat([master.unsqueeze(0), table[1:].to(master.dtype)])
            y = y + reference.weak_columns_product(x, WeakColumns(self.outlier_idx, table), slots)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def forward(
        self, x: torch.Tensor, slots: torch.Tensor | None = None, fast: bool = False
    ) -> torch.Tensor:
        """x: [B, ..., in]; slots: int [B] adapter slot per leading row (None = slot 0);
        fast: the step may take the layer's fast kernel (on the CPU the 4-bit one, bf16
        activations); off, the CPU computes in fp32 exactly as offline."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        if self._needs_twin(x):
            return self._torch_forward(x, slots)
        if x.is_cuda and not self.force_reference:
            from . import cuda_ops

            if cuda_ops.available():
                return cuda_ops.linear_forward(x, self.packed, self.weak, self.bias, slots)
        if x.is_cuda or self.force_reference:
            return reference.owq_matmul(x, self.packed, self.weak, self.bias, slots)
        if self.cpu is None or self.cpu.dtype != x.dtype:
            self.prepare(x.dtype)
        return cpu_ops.linear(x, self.cpu, self.packed, self.weak, self.bias, slots, fast)
