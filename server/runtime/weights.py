"""A checkpoint's tensors by name, as the runtime builders ask for them.

Unquantized tensors (embeddings, norms, positions, an fp16 head) come cast to the compute dtype on
the device; quantized linears come as `OWQLinear`s built from their stored tensors, fused where
they read the same input (`kernels.fused`), with slot tables of `num_slots` adapter slots. Every
stored linear's name is recorded in `targets` as (runtime layer, part): how adapters, written per
stored layer, find their place. Knows tensor names and kernels; nothing about model families'
maths, requests or files.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from owq.kernels import OWQLinear
from owq.kernels.fused import fuse


class Weights:
    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        num_slots: int = 0,
        table_dtype: torch.dtype | None = None,
    ):
        self.tensors = tensors
        self.dtype, self.device = dtype, torch.device(device)
        self.num_slots = num_slots
        self.table_dtype = table_dtype or torch.float16  # as stored: adapters are fp16
        self.targets: dict[str, tuple[OWQLinear, int]] = {}

    def has(self, name: str) -> bool:
        return name in self.tensors

    def tensor(self, name: str) -> torch.Tensor:
        """An unquantized tensor in the compute dtype, on the device."""
        if name not in self.tensors:
            raise KeyError(f"the checkpoint has no tensor {name}")
        return self.tensors[name].to(device=self.device, dtype=self.dtype)

    def optional(self, name: str) -> torch.Tensor | None:
        return self.tensor(name) if name in self.tensors else None

    def table(self, prefix: str, cls: type[OWQLinear]) -> OWQLinear:
        """A quantized vocabulary table stored under `prefix` (`kernels.owq_vocab`)."""
        table = cls.from_tensors(self.tensors, prefix).to(self.device)
        if hasattr(table, "dtype"):
            table.dtype = self.dtype  # an embedding returns rows in the compute dtype
        return table

    def linears(self, prefix: str, names: Sequence[str]) -> tuple[OWQLinear, list[int]]:
        """The stored linears `prefix + name` (they read one input) fused into one layer, and
        each one's output width."""
        layers = [OWQLinear.from_tensors(self.tensors, f"{prefix}{n}.", 0) for n in names]
        fused = fuse(layers)
        fused.resize_slots(self.num_slots, self.table_dtype)
        fused = fused.to(self.device)
        for part, name in enumerate(names):
            self.targets[prefix + name] = (fused, part)
        return fused, [layer.out_features for layer in layers]
