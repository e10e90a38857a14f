"""Bits accounting of a saved checkpoint, read from the safetensors header and the file size.

True bits per weight count every stored byte (codes, scales, zero points, weak columns, their
indices); the paper's nominal bits count only the codes plus the fp16 weak columns. Knows the
tensor names of `OWQLinear`, nothing about algorithms.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import WEIGHTS_NAME, read_quant_config
from .packing import stored_layout

DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
PACKED = ("qweight", "scales", "qzeros")
LAYER_PARTS = (*PACKED, "oweight", "outlier_idx", "protected_idx", "protected_weight")


@dataclass(frozen=True)
class LayerBits:
    name: str
    in_features: int
    out_features: int
    weak_columns: int
    true_bits: float  # all stored bytes of the layer's weight / (in * out)
    nominal_bits: float  # wbits + 16 * k / in (the paper's count)


@dataclass(frozen=True)
class CheckpointBits:
    layers: list[LayerBits]
    bits_per_weight_linear: float
    nominal_bits_linear: float
    bits_per_weight_total: float  # file bytes * 8 / every parameter of the model
    file_bytes: int
    parameters: int


def read_header(path: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", ...}} from a safetensors file, without loading it."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def _nbytes(entry: dict) -> int:
    return _numel(entry) * DTYPE_BYTES[entry["dtype"]]


def _numel(entry: dict) -> int:
    count = 1
    for dim in entry["shape"]:
        count *= dim
    return count


def _layout(header: dict, name: str) -> tuple[int, int, int, int]:
    """(in, out, bits, group_size) of a stored quantized layer, from its header shapes."""
    shapes = (torch.empty(header[f"{name}.{p}"]["shape"], device="meta") for p in PACKED)
    return stored_layout(*shapes)


def checkpoint_bits(path: str | Path) -> CheckpointBits:
    """True bits of every quantized layer and of the whole file. `bits_per_weight_linear` counts
    the quantized linears of the blocks; a quantized vocabulary table (head / embedding, with its
    protected rows) is a layer of its own in `layers` and in the whole-file figure."""
    path = Path(path)
    read_quant_config(path)
    weights = path / WEIGHTS_NAME
    header = read_header(weights)
    layers, linear_bytes, linear_weights, nominal = [], 0, 0, 0.0
    for name in sorted(k[: -len(".qweight")] for k in header if k.endswith(".qweight")):
        in_f, out_f, wbits, _ = _layout(header, name)
        k = _numel(header[f"{name}.outlier_idx"]) if f"{name}.outlier_idx" in header else 0
        stored = sum(_nbytes(header[f"{name}.{p}"]) for p in LAYER_PARTS if f"{name}.{p}" in header)
        layer = LayerBits(name, in_f, out_f, k, stored * 8 / (in_f * out_f), wbits + 16 * k / in_f)
        layers.append(layer)
        if f"{name}.protected_idx" not in header:  # a linear, not a vocabulary table
            linear_bytes += stored
            linear_weights += in_f * out_f
            nominal += layer.nominal_bits * in_f * out_f
    quantized_parts = {f"{lb.name}.{p}" for lb in layers for p in LAYER_PARTS}
    params = sum(lb.in_features * lb.out_features for lb in layers)
    params += sum(_numel(e) for k, e in header.items() if k not in quantized_parts)
    file_bytes = weights.stat().st_size
    return CheckpointBits(
        layers=layers,
        bits_per_weight_linear=linear_bytes * 8 / max(linear_weights, 1),
        nominal_bits_linear=nominal / max(linear_weights, 1),
        bits_per_weight_total=file_bytes * 8 / max(params, 1),
        file_bytes=file_bytes,
        parameters=params,
    )
