"""Adapter helpers for the quantizer CLIs: the format lives in `owq.kernels.adapters`.

Re-exports the format's API and adds `apply_adapter` that also takes a directory and turns the
format's errors into `ValueError`s, which the CLI reports in one line (exit 2). Knows no training.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from owq.kernels import adapters as _format
from owq.kernels.adapters import (  # noqa: F401  (re-exported)
    Adapter,
    AdapterError,
    AdapterMismatch,
    adapter_from_model,
    check_base,
    load_adapter,
    save_adapter,
)


class AdapterUsageError(ValueError):
    """An adapter the user named cannot be used; one line naming the problem."""


def read_adapter(adapter: Adapter | str | Path) -> Adapter:
    """The adapter itself, or the one loaded from a directory (AdapterUsageError if unreadable)."""
    if isinstance(adapter, Adapter):
        return adapter
    try:
        return load_adapter(adapter)
    except AdapterError as e:
        raise AdapterUsageError(str(e)) from None


def apply_adapter(model: nn.Module, adapter: Adapter | str | Path) -> Adapter:
    """Overwrite the model's weak columns with the adapter's (an Adapter or a dir); returns it.

    A mismatched base raises AdapterUsageError naming both fingerprints.
    """
    adapter = read_adapter(adapter)
    try:
        _format.apply_adapter(model, adapter)
    except AdapterError as e:
        raise AdapterUsageError(str(e)) from None
    return adapter
