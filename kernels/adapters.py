"""Weak-column adapters on disk: `adapter_config.json` + `adapter.safetensors` (`<layer>.oweight`).

An adapter is a per-task copy of every (or some) quantized layer's fp16 weak columns [k, out].
It records the fingerprint of its base (`checkpoint.base_fingerprint`: the hash of the base's
weak-column plan, names, shapes and `outlier_idx` of every OWQLinear with k > 0) and is refused
on any other base. Knows the `OWQLinear` tensor
names, nothing about training or serving.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .atomic import replace_dir
from .checkpoint import base_fingerprint
from .owq_linear import OWQLinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
ADAPTER_FORMAT_VERSION = 1


class AdapterError(Exception):
    """An adapter that cannot be read; one line naming the problem."""


class AdapterMismatch(AdapterError):
    """The adapter was tuned on another base."""


@dataclass
class Adapter:
    name: str
    base_fingerprint: str
    columns: dict[str, torch.Tensor]  # layer name -> fp16 [k, out]
    config: dict = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.columns.values())


def adapter_from_model(
    model: nn.Module, name: str, layers: list[str] | None = None, **config
) -> Adapter:
    """Snapshot the current `oweight` of the model's OWQLinears (all, or `layers`) as an adapter."""
    columns = {
        n: m.oweight.detach().to(torch.float16).cpu().clone()
        for n, m in model.named_modules()
        if isinstance(m, OWQLinear) and m.num_weak and (layers is None or n in layers)
    }
    return Adapter(name, base_fingerprint(model), columns, config)


def save_adapter(adapter: Adapter, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write atomically (`atomic.replace_dir`): a reader sees the old adapter or the new one."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"adapter path {out} exists (pass overwrite to replace it)")
    with replace_dir(out, overwrite=overwrite) as tmp:
        tensors = {f"{k}.oweight": v.contiguous() for k, v in adapter.columns.items()}
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        config = {
            "format_version": ADAPTER_FORMAT_VERSION,
            "name": adapter.name,
            "base_fingerprint": adapter.base_fingerprint,
            **adapter.config,
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def load_adapter(path: str | Path) -> Adapter:
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file() or not weights.is_file():
        raise AdapterError(f"{path} is not an adapter: needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(config_file.read_text())
        tensors = load_file(weights)
    except Exception as e:  # damaged JSON or safetensors
        raise AdapterError(f"{path} cannot be read: {e}") from None
    if config.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise AdapterError(
            f"{path}: unknown adapter format_version {config.get('format_version')!r}"
        )
    columns = {k.removesuffix(".oweight"): v for k, v in tensors.items() if k.endswith(".oweight")}
    name = config.pop("name", path.name)
    return Adapter(name, config.pop("base_fingerprint", ""), columns, config)


def check_base(adapter: Adapter, fingerprint: str) -> None:
    """AdapterMismatch naming both fingerprints unless the adapter was tuned on this base."""
    if adapter.base_fingerprint != fingerprint:
        raise AdapterMismatch(
            f"adapter {adapter.name!r} was tuned on base {adapter.base_fingerprint}, "
            f"this base is {fingerprint}"
        )


def adapter_layers(model: nn.Module, adapter: Adapter) -> dict[str, OWQLinear]:
    """The model's OWQLinears the adapter covers, checking base and shapes."""
    check_base(adapter, base_fingerprint(model))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, OWQLinear)}
    for name, cols in adapter.columns.items():
        layer = layers.get(name)
        if layer is None or tuple(cols.shape) != (layer.num_weak, layer.out_features):
            raise AdapterError(f"adapter {adapter.name!r}: layer {name} does not fit the base")
    return {name: layers[name] for name in adapter.columns}


def apply_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Overwrite the base's own weak columns (slot 0) with the adapter's, for offline use."""
    with torch.no_grad():
        for name, layer in adapter_layers(model, adapter).items():
            layer.oweight.copy_(adapter.columns[name].to(layer.oweight.dtype))
