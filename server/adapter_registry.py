"""The adapters a server may use: plain names inside `--adapters DIR`, loaded into host memory.

Implements protocol's `AdapterManager`. A name is never a path: it must match `NAME_RE`, and a
symlink whose target leaves the directory is refused. The registry alone knows which name means
the base (`adapter_name`). A request's adapter is resolved once (`resolve`) into the
`AdapterHandle` it keeps to the end: loaded on demand from the directory when it is not loaded
yet (concurrent first requests share one load), at most `max_loaded` at once, the least
recently used one evicted to make room (an idle one first). Loading checks the base
fingerprint, every layer's shape and that every value is finite; a refused adapter keeps its
reason (`states()`), with the fix. Each load of a name gets a new version, so unloading,
evicting or replacing an adapter never changes the weights of a request already accepted.
Device slots are the model thread's business (`adapter_slots.SlotTable`); this module knows no
tensors on devices, no batches, no HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from owq.kernels.adapters import (
    CONFIG_NAME,
    Adapter,
    AdapterError,
    AdapterMismatch,
    check_base,
    load_adapter,
)
from owq.threads import single_thread

from .protocol import (
    ADAPTER_NAME_PATTERN,
    DEFAULT_MAX_LOADED,
    AdapterBaseMismatch,
    AdapterConflict,
    AdapterInfo,
    AdapterNotFound,
    AdapterNotLoaded,
    AdapterState,
    EngineObserver,
    InvalidAdapterName,
    shown,
)

log = logging.getLogger(__name__)

NAME_RE = re.compile(ADAPTER_NAME_PATTERN)
FIX = "re-tune it on this base, or quantize the base with --weak-columns-from"


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
            f"invalid adapter name {shown(name)}: use 1-64 letters, digits, '.', '_' or '-' "
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


def check_columns(name: str, columns: dict[str, torch.Tensor], shapes: dict) -> None:
    """AdapterConflict unless every layer fits the base's shape and holds only finite values."""
    for layer, cols in columns.items():
        want = shapes.get(layer)
        if want is None or tuple(cols.shape) != want:
            raise AdapterConflict(
                f"adapter {name!r}: layer {layer} has shape {tuple(cols.shape)}, "
                f"the base expects {want}"
            )
        if not bool(torch.isfinite(cols).all()):
            raise AdapterConflict(
                f"adapter {name!r}: layer {layer} holds NaN or infinite values; re-tune or "
                "re-export it"
            )


def adapter_name(requested: str | None, base_name: str) -> str | None:
    """The adapter a requested name stands for; None = the base (no name, or the base's own)."""
    name = (requested or "").strip()
    return None if not name or name == base_name else name


class AdapterRegistry:
    """protocol.AdapterManager over one adapters directory (or none)."""

    def __init__(
        self,
        directory: str | Path | None,
        fingerprint: str,
        layer_shapes: dict[str, tuple[int, int]],
        base_name: str,
        observer: EngineObserver | None = None,
        max_loaded: int = DEFAULT_MAX_LOADED,
    ):
        self.directory = Path(directory) if directory is not None else None
        self.fingerprint = fingerprint
        self.layer_shapes = layer_shapes  # layer name -> (k, out) of every layer with weak columns
        self.base_name = base_name
        self.observer = observer
        self.max_loaded = max_loaded
        self._lock = threading.Lock()
        self._loaded: dict[str, AdapterHandle] = {}  # least recently used first
        self._pins: dict[tuple[str, int], int] = {}  # handle key -> requests using it
        self._refused: dict[str, tuple[float, AdapterConflict]] = {}  # name -> (mtime, why)
        self._loading: dict[str, asyncio.Future] = {}
        self._version = 0

    # names ------------------------------------------------------------------------------
    def adapter_name(self, requested: str | None) -> str | None:
        """The adapter a request names; None = the base (no name, or the base's own)."""
        return adapter_name(requested, self.base_name)

    def available(self) -> list[str]:
        if self.directory is None or not self.directory.is_dir():
            return []
        names = []
        for entry in sorted(self.directory.iterdir()):
            try:
                real = resolve_in_dir(self.directory, entry.name)
            except (InvalidAdapterName, AdapterNotFound):
                continue
            if (real / CONFIG_NAME).is_file():
                names.append(entry.name)
        return names

    def loaded(self) -> list[AdapterInfo]:
        with self._lock:
            return [h.info for h in self._loaded.values()]

    def states(self) -> list[AdapterState]:
        """Every adapter of the dir or loaded: loaded, loadable, or refused with the reason."""
        with self._lock:
            loaded = dict(self._loaded)
        out = []
        for name in sorted(set(self.available()) | set(loaded)):
            if name in loaded:
                out.append(AdapterState(name, "loaded", loaded[name].info))
                continue
            reason = self._refusal(name)
            out.append(AdapterState(name, "refused" if reason else "loadable", None, reason))
        return out

    # loading ----------------------------------------------------------------------------
    async def load(self, name: str) -> AdapterInfo:
        """Load (or replace) `name` from the adapters dir; in-flight requests keep their weights."""
        return (await self._load(name)).info

    async def unload(self, name: str) -> None:
        check_name(name)
        with self._lock:
            if self._loaded.pop(name, None) is None:
                raise AdapterNotLoaded(f"adapter {name!r} is not loaded")
            count = len(self._loaded)
        log.info("adapter %s unloaded", name)
        self._notify(count, None)

    def current(self, name: str | None) -> AdapterHandle | None:
        """The loaded version of adapter `name` (None = the base), or AdapterNotLoaded."""
        if name is None:
            return None
        with self._lock:
            found = self._loaded.get(name)
            if found is not None:
                self._loaded[name] = self._loaded.pop(name)  # most recently used
        if found is None:
            raise AdapterNotLoaded(f"model {shown(name)} is not loaded")
        return found

    async def resolve(self, name: str | None) -> AdapterHandle | None:
        """The handle a request runs on: the loaded version of `name`, else loaded on demand
        from the adapters dir (one load however many requests wait for it). None = the base.
        AdapterNotLoaded (404) when no such adapter exists, AdapterConflict (409) when it is
        refused."""
        try:
            return self.current(name)
        except AdapterNotLoaded:
            pass
        pending = self._loading.get(name)
        if pending is None:
            pending = asyncio.ensure_future(self._load_on_demand(name))
            self._loading[name] = pending
            pending.add_done_callback(lambda done: self._loaded_or_failed(name, done))
        return await asyncio.shield(pending)

    # requests in flight -----------------------------------------------------------------
    def pin(self, handle: AdapterHandle | None) -> None:
        if handle is not None:
            with self._lock:
                self._pins[handle.key] = self._pins.get(handle.key, 0) + 1

    def unpin(self, handle: AdapterHandle | None) -> None:
        if handle is None:
            return
        with self._lock:
            left = self._pins.get(handle.key, 0) - 1
            if left > 0:
                self._pins[handle.key] = left
            else:
                self._pins.pop(handle.key, None)

    # internals --------------------------------------------------------------------------
    def _loaded_or_failed(self, name: str, done: asyncio.Future) -> None:
        self._loading.pop(name, None)
        if not done.cancelled():
            done.exception()  # retrieved here: every waiter may have gone meanwhile

    async def _load_on_demand(self, name: str) -> AdapterHandle:
        try:
            return await self._load(name)
        except (InvalidAdapterName, AdapterNotFound) as e:
            raise AdapterNotLoaded(
                f"model {shown(name)} does not exist (GET /v1/models lists the models): {e}"
            ) from None

    async def _load(self, name: str) -> AdapterHandle:
        path = self._path(name)
        self._raise_if_refused(name)
        start = time.perf_counter()
        try:
            columns, config, fingerprint = await asyncio.to_thread(self._read, name, path)
        except AdapterConflict as e:
            self._remember_refusal(name, e)
            raise
        seconds = time.perf_counter() - start
        num_bytes = sum(t.numel() * t.element_size() for t in columns.values())
        info = AdapterInfo(name, fingerprint, num_bytes, seconds, config)
        handle = self._install(name, columns, info)
        log.info(
            "adapter %s v%d loaded (%d bytes, %.3fs)", name, handle.version, num_bytes, seconds
        )
        return handle

    def _install(self, name: str, columns: dict, info: AdapterInfo) -> AdapterHandle:
        with self._lock:
            if name not in self._loaded and len(self._loaded) >= self.max_loaded:
                self._evict_one()
            self._version += 1
            handle = AdapterHandle(name, self._version, columns, info)
            self._loaded.pop(name, None)
            self._loaded[name] = handle
            self._refused.pop(name, None)
            count = len(self._loaded)
        self._notify(count, info.load_seconds)
        return handle

    def _evict_one(self) -> None:
        """Drop the least recently used idle adapter, else the least recently used one (lock
        held). Requests running on it keep their handle, so their version lives on until they
        end; a later request loads the adapter again."""
        idle = [n for n, h in self._loaded.items() if not self._pins.get(h.key)]
        name = idle[0] if idle else next(iter(self._loaded))
        del self._loaded[name]
        log.info("adapter %s evicted (least recently used%s)", name, ", idle" if idle else "")

    def _path(self, name: str) -> Path:
        check_name(name)
        if name == self.base_name:
            raise InvalidAdapterName(f"{name!r} is the base model's name, not an adapter")
        if self.directory is None:
            raise AdapterNotFound("the server was started without an adapters directory")
        return resolve_in_dir(self.directory, name)

    def _read(self, name: str, path: Path) -> tuple[dict[str, torch.Tensor], dict, str]:
        """On a helper thread, on it alone: a parallel region here would give this thread an
        OpenMP team of its own, which slows every later decode step (`owq.threads`)."""
        with single_thread():
            return self._read_files(name, path)

    def _read_files(self, name: str, path: Path) -> tuple[dict[str, torch.Tensor], dict, str]:
        try:
            adapter = load_adapter(path)
            check_base(adapter, self.fingerprint)
        except AdapterMismatch as e:
            raise AdapterBaseMismatch(f"{e} ({FIX})") from None
        except AdapterError as e:
            raise AdapterConflict(f"adapter {name!r} cannot be read: {e}") from None
        check_columns(name, adapter.columns, self.layer_shapes)
        columns = {k: v.to(torch.float16).contiguous() for k, v in adapter.columns.items()}
        return columns, dict(adapter.config), adapter.base_fingerprint

    def _config_mtime(self, name: str) -> float | None:
        if self.directory is None:
            return None
        try:
            return (resolve_in_dir(self.directory, name) / CONFIG_NAME).stat().st_mtime
        except (OSError, InvalidAdapterName, AdapterNotFound):
            return None

    def _remember_refusal(self, name: str, error: AdapterConflict) -> None:
        mtime = self._config_mtime(name)
        if mtime is not None:
            with self._lock:
                self._refused[name] = (mtime, error)
        log.warning("adapter %s refused: %s", name, error)

    def _known_refusal(self, name: str) -> AdapterConflict | None:
        """The refusal remembered for `name`, while its files have not changed since."""
        with self._lock:
            known = self._refused.get(name)
        return known[1] if known is not None and known[0] == self._config_mtime(name) else None

    def _raise_if_refused(self, name: str) -> None:
        """A refusal is kept until the adapter's files change: no re-read on every request."""
        if (known := self._known_refusal(name)) is not None:
            raise type(known)(str(known))

    def _refusal(self, name: str) -> str | None:
        """Why `name` (not loaded) would be refused: a remembered reason, else the base
        fingerprint in its config (read without the weights); None when it looks loadable."""
        if (known := self._known_refusal(name)) is not None:
            return str(known)
        try:
            config = json.loads((resolve_in_dir(self.directory, name) / CONFIG_NAME).read_text())
            check_base(Adapter(name, str(config.get("base_fingerprint", "")), {}), self.fingerprint)
        except AdapterMismatch as e:
            return f"{e} ({FIX})"
        except (OSError, ValueError, AttributeError, InvalidAdapterName, AdapterNotFound):
            return None  # unreadable: a load says why
        return None

    def _notify(self, count: int, seconds: float | None) -> None:
        if self.observer is not None:
            try:
                self.observer.on_adapters(count, seconds)
            except Exception:  # a metrics bug must not break adapter management
                log.exception("observer.on_adapters failed")
