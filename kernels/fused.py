"""Fuse quantized linears that read the same input (q/k/v, gate/up) into one `OWQLinear`.

The fused layer computes ``cat([layer(x) for layer in layers], -1)`` in one op: the packed codes,
scales and zero points are concatenated along the output (the layout packs along the input, so
this is a plain concatenation for codes and scales; zero points are repacked), the weak inputs
are the sorted union of every layer's, and its slot table [S+1, K, OUT] holds each layer's weak
columns in that layer's own rows and output columns (zeros elsewhere). A stored layer's dense
codes at another layer's weak rows stay as they are: the fused layer is exact because it never
relies on those rows being zero. Each stored layer becomes a `Part` (its output columns and
table rows), which is how adapters written per stored layer land in the fused table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .owq_linear import OWQLinear, Part
from .packing import pack_zeros, unpack_zeros


def _check_same(layers: Sequence[OWQLinear]) -> None:
    first = layers[0]
    for layer in layers[1:]:
        same = (layer.in_features, layer.bits, layer.group_size, layer.num_slots)
        want = (first.in_features, first.bits, first.group_size, first.num_slots)
        if same != want:
            raise ValueError(
                f"layers to fuse differ in (in_features, bits, group_size, slots): {same} vs {want}"
            )


def _zeros(layers: Sequence[OWQLinear]) -> torch.Tensor:
    bits = layers[0].bits
    parts = [unpack_zeros(layer.qzeros, bits, layer.out_features) for layer in layers]
    return pack_zeros(torch.cat(parts, 1), bits)


def _bias(layers: Sequence[OWQLinear]) -> torch.Tensor | None:
    if all(layer.bias is None for layer in layers):
        return None
    return torch.cat([
        layer.bias if layer.bias is not None else layer.scales.new_zeros(layer.out_features)
        for layer in layers
    ])  # fmt: skip


def fuse(layers: Sequence[OWQLinear]) -> OWQLinear:
    """A new OWQLinear equal to the concatenation of `layers` along the output (also for a single
    layer: the runtime owns its layers). Parts are in the order given."""
    _check_same(layers)
    first = layers[0]
    union = torch.unique(torch.cat([layer.outlier_idx.long().cpu() for layer in layers]))  # sorted
    out = sum(layer.out_features for layer in layers)
    fused = OWQLinear(
        first.in_features, out, first.bits, first.group_size, union.numel(),
        bias=_bias(layers) is not None, num_slots=first.num_slots, device=first.qweight.device,
    )  # fmt: skip
    fused.qweight = torch.cat([layer.qweight for layer in layers], 1)
    fused.scales = torch.cat([layer.scales for layer in layers], 1)
    fused.qzeros = _zeros(layers).to(first.qzeros.device)
    fused.outlier_idx = union.to(torch.int32).to(first.outlier_idx.device)
    fused.bias = _bias(layers)
    table = first.weak_table.new_zeros(first.num_slots + 1, union.numel(), out)
    parts, offset = [], 0
    for layer in layers:
        rows = torch.searchsorted(union, layer.outlier_idx.long().cpu())
        table[:, rows.to(table.device), offset : offset + layer.out_features] = layer.weak_table
        parts.append(Part(offset, layer.out_features, rows))
        offset += layer.out_features
    fused.weak_table = table
    fused.parts = tuple(parts)
    return fused
