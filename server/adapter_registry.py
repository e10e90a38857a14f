"""The adapters a server may use: plain names inside `--adapters DIR`, loaded into host memory.

Implements protocol's `AdapterManager`. A name is never a path: it must match `NAME_RE`, and a
symlink whose target leaves the directory is refused. Loading checks the base fingerprint and
every layer's shape; each load of a name gets a new version, and a request captures the
`AdapterHandle` current when it is submitted, so unloading or replacing an adapter never changes
the weights of a request already accepted. Device slots are the model thread's business
(`adapter_slots.SlotTable`); this module knows no tensors on devices, no batches, no HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from owq.kernels.adapters import AdapterError, AdapterMismatch, check_base, load_adapter

from .protocol import (
    AdapterConflict,
    AdapterInfo,
    AdapterNotFound,
    AdapterNotLoaded,
    EngineObserver,
    InvalidAdapterName,
)

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class AdapterHandle:
    """One loaded version of an adapter: host fp16 columns per layer name ([k, out])."""

    name: str
    version: int
    columns: dict[str, torch.Tensor]
    info: AdapterInfo

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-' "
            "starting with a letter or digit (a name, never a path)"
        )


def resolve_in_dir(directory: Path, name: str) -> Path:
    """The adapter dir of `name` inside `directory`, refusing anything that leaves it."""
    check_name(name)
    path = directory / name
    if not path.exists() and not path.is_symlink():
        raise AdapterNotFound(f"no adapter named {name!r} in the adapters directory")
    real, root = path.resolve(), directory.resolve()
    if root not in real.parents:
        raise InvalidAdapterName(f"adapter {name!r} is a link that leaves the adapters directory")
    if not real.is_dir():
        raise AdapterNotFound(f"adapter {name!r} is not a directory")
    return real


class AdapterRegistry:
    """protocol.AdapterManager over one adapters directory (or none)."""

    def __init__(
        self,
        directory: str | Path | None,
        fingerprint: str,
        layer_shapes: dict[str, tuple[int, int]],
        base_name: str,
        observer: EngineObserver | None = None,
    ):
        self.directory = Path(directory) if directory is not None else None
        self.fingerprint = fingerprint
        self.layer_shapes = layer_shapes  # layer name -> (k, out) of every layer with weak columns
        self.base_name = base_name
        self.observer = observer
        self._lock = threading.Lock()
        self._loaded: dict[str, AdapterHandle] = {}
        self._version = 0

    # AdapterManager ---------------------------------------------------------------------
    def available(self) -> list[str]:
        if self.directory is None or not self.directory.is_dir():
            return []
        names = []
        for entry in sorted(self.directory.iterdir()):
            try:
                real = resolve_in_dir(self.directory, entry.name)
            except (InvalidAdapterName, AdapterNotFound):
                continue
            if (real / "adapter_config.json").is_file():
                names.append(entry.name)
        return names

    def loaded(self) -> list[AdapterInfo]:
        with self._lock:
            return [h.info for h in self._loaded.values()]

    async def load(self, name: str) -> AdapterInfo:
        """Load (or replace) `name` from the adapters dir; in-flight requests keep their weights."""
        path = self._path(name)
        start = time.perf_counter()
        columns, config, fingerprint = await asyncio.to_thread(self._read, name, path)
        seconds = time.perf_counter() - start
        num_bytes = sum(t.numel() * t.element_size() for t in columns.values())
        info = AdapterInfo(name, fingerprint, num_bytes, seconds, config)
        with self._lock:
            self._version += 1
            self._loaded[name] = AdapterHandle(name, self._version, columns, info)
            count = len(self._loaded)
        log.info("adapter %s loaded (%d bytes, %.3fs)", name, num_bytes, seconds)
        self._notify(count, seconds)
        return info

    async def unload(self, name: str) -> None:
        check_name(name)
        with self._lock:
            if self._loaded.pop(name, None) is None:
                raise AdapterNotLoaded(f"adapter {name!r} is not loaded")
            count = len(self._loaded)
        log.info("adapter %s unloaded", name)
        self._notify(count, None)

    # engine side ------------------------------------------------------------------------
    def handle(self, name: str | None) -> AdapterHandle | None:
        """The current version of `name` (None = the base), or AdapterNotLoaded."""
        if name is None or name == self.base_name:
            return None
        with self._lock:
            found = self._loaded.get(name)
        if found is None:
            raise AdapterNotLoaded(f"adapter {name!r} is not loaded")
        return found

    # internals --------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        check_name(name)
        if name == self.base_name:
            raise InvalidAdapterName(f"{name!r} is the base model's name, not an adapter")
        if self.directory is None:
            raise AdapterNotFound("the server was started without an adapters directory")
        return resolve_in_dir(self.directory, name)

    def _read(self, name: str, path: Path) -> tuple[dict[str, torch.Tensor], dict, str]:
        try:
            adapter = load_adapter(path)
            check_base(adapter, self.fingerprint)
        except AdapterMismatch as e:
            raise AdapterConflict(str(e)) from None
        except AdapterError as e:
            raise AdapterNotFound(f"adapter {name!r} cannot be read: {e}") from None
        for layer, cols in adapter.columns.items():
            want = self.layer_shapes.get(layer)
            if want is None or tuple(cols.shape) != want:
                raise AdapterConflict(
                    f"adapter {name!r}: layer {layer} has shape {tuple(cols.shape)}, "
                    f"the base expects {want}"
                )
        columns = {k: v.to(torch.float16).contiguous() for k, v in adapter.columns.items()}
        return columns, dict(adapter.config), adapter.base_fingerprint

    def _notify(self, count: int, seconds: float | None) -> None:
        if self.observer is not None:
            try:
                self.observer.on_adapters(count, seconds)
            except Exception:  # a metrics bug must not break adapter management
                log.exception("observer.on_adapters failed")
