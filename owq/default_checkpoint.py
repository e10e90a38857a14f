"""The built-in default checkpoint: the default model quantized once (OWQ 3-bit, k = 8) and cached.

`owq serve` with no CKPT calls `default_checkpoint()`: it returns the cached checkpoint dir,
quantizing the default model into it first if it is not there (deterministic: fixed settings and
seed). This glue lives in the common `owq` package because the server must not import the
quantizer; it names the quantizer API `owq.quantizer.api.quantize` and imports it only when a
checkpoint has to be made.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "default-owq3-k8"
# The settings of the default checkpoint (owq.quantizer.settings.QuantizeSettings fields).
DEFAULT_SETTINGS = {"method": "owq", "wbits": 3, "weak_columns": 8, "groupsize": -1, "seed": 0}


def cache_dir() -> Path:
    """$OWQ_CACHE, else $XDG_CACHE_HOME/owq, else ~/.cache/owq."""
    if os.environ.get("OWQ_CACHE"):
        return Path(os.environ["OWQ_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "owq"


def default_checkpoint_path() -> Path:
    return cache_dir() / CHECKPOINT_NAME


@contextmanager
def _lock(path: Path):
    """An exclusive file lock, so two `owq serve` starting at once quantize only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def default_checkpoint() -> Path:
    """The cached default checkpoint dir, made on first use (minutes on 2 CPU cores)."""
    from owq.kernels.checkpoint import is_checkpoint

    out = default_checkpoint_path()
    if is_checkpoint(out):
        return out
    with _lock(out.with_name(out.name + ".lock")):
        if is_checkpoint(out):  # made by another process while we waited
            return out
        log.info("quantizing the default model once into %s (OWQ 3-bit, k = 8)", out)
        _quantize_default(out)
    return out


def _quantize_default(out: Path) -> None:
    from owq.quantizer.api import quantize
    from owq.quantizer.settings import QuantizeSettings

    quantize("default", out, QuantizeSettings(**DEFAULT_SETTINGS), overwrite=True)


def default_adapters_dir() -> Path | None:
    """`examples/adapters/` in the working dir or the source tree, if there (used without
    --adapters)."""
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = root / "examples" / "adapters"
        if candidate.is_dir():
            return candidate
    return None
