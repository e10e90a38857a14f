"""The built-in default checkpoint: the default model quantized once (OWQ 3-bit linears, 4-bit
vocabulary table, fp16 weak columns from one whole-file budget) and cached.

`owq serve` with no CKPT calls `default_checkpoint()`: it returns the cached checkpoint dir,
quantizing the default model into it first if it is not there, or is damaged (truncated, checksum
mismatch) or was made with other weak columns, protected rows or settings. The weak columns and
the protected rows come from the committed plan (`owq/builtin/default_plan.json`), so the
default's fingerprint, and with it the fit of the shipped adapters, is the same on every machine
and owq version. This glue lives in the common
`owq` package because the server must not import the quantizer; it names the quantizer API
`owq.quantizer.api.quantize` and imports it only when a checkpoint has to be made.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "default-owq3-global-h4"
# The settings of the default checkpoint (owq.quantizer.settings.QuantizeSettings fields): the
# linears at 3 bits and the tied vocabulary table at 4 bits in groups of 32. The built-in plan
# gives the fp16 weak columns of every linear: the choice of `--budget whole --allocation
# global --head-protect-by none` at 3.45 bits per weight for the whole file, which ranks them by
# measured benefit per byte. Protected fp16 rows of the table lost to weak columns at these
# bytes (0.6-1.0% perplexity over two seeds), so it buys none (BENCHMARKS.md, the default
# without rows: 0.59x the GGUF's bytes, perplexity a little below that of the 3-bit linears
# with the fp16 table).
DEFAULT_SETTINGS = {
    "method": "owq",
    "wbits": 3,
    "groupsize": -1,
    "seed": 0,
    "head_bits": 4,
    "head_groupsize": 32,
}
# quantization_config entries a cached default must carry to be this default
RECORDED = {
    "head_bits": DEFAULT_SETTINGS["head_bits"],
    "head_group_size": DEFAULT_SETTINGS["head_groupsize"],
    "head_protect": 0.0,  # the rows are the plan's
}
# Measured: the first `owq serve` on a fresh cache, 2 CPU cores (BENCHMARKS.md, first run).
FIRST_RUN_MINUTES_2_CORES = 9  # idle cores (4-9 by the CPU); more on cores shared with other jobs


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


def default_plan():
    """The committed weak-column plan of the default checkpoint (`kernels.plan.WeakColumnPlan`)."""
    from owq.builtin.model import default_plan_path
    from owq.kernels.plan import read_plan_file

    return read_plan_file(default_plan_path())


def checkpoint_problem(path: Path, plan=None) -> str | None:
    """Why the checkpoint dir `path` cannot be used (missing, damaged, another plan), or None.

    Verifies the weights against the checksum in config.json; `plan`: the weak-column plan
    (`kernels.plan.WeakColumnPlan`) it must have been made with, weak columns and protected rows,
    and then the default's settings too."""
    from owq.kernels.checkpoint import WEIGHTS_NAME, CheckpointError, file_sha256, read_quant_config
    from owq.kernels.plan import plan_of_checkpoint

    if not path.exists():
        return "missing"
    try:
        recorded = read_quant_config(path)
        expected = recorded.get("model_sha256")
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            return f"incomplete ({WEIGHTS_NAME} is missing)"
        if expected and file_sha256(weights) != expected:
            return f"damaged ({WEIGHTS_NAME} does not match its checksum: truncated or modified)"
        theirs = plan_of_checkpoint(path)
    except CheckpointError as e:
        return f"unreadable ({e})"
    if plan is None:
        return None
    if theirs.fingerprint != plan.fingerprint:
        return (
            f"made with other weak columns (base {theirs.fingerprint}, the built-in plan is "
            f"{plan.fingerprint})"
        )
    if theirs.tables != plan.tables:
        return "made with other protected vocabulary rows (an older default)"
    if any(recorded.get(k) != v for k, v in RECORDED.items()):
        return "made with other settings (an older default)"
    return None


def default_checkpoint() -> Path:
    """The cached default checkpoint dir, made (again) when it is missing, damaged or stale."""
    out = default_checkpoint_path()
    plan = default_plan()
    if checkpoint_problem(out, plan) is None:
        return out
    with _lock(out.with_name(out.name + ".lock")):
        problem = checkpoint_problem(out, plan)  # another process may have made it
        if problem is None:
            return out
        if problem != "missing":
            log.warning("the cached default %s is %s: quantizing it again", out, problem)
        log.info(
            "quantizing the default model once into %s (OWQ 3-bit, 4-bit vocabulary table, %d "
            "weak columns and %d protected rows from the built-in plan %s): about %d minutes on "
            "2 CPU cores (this machine has %d); progress below",
            out, plan.weak_columns, plan.protected_rows, plan.fingerprint,
            FIRST_RUN_MINUTES_2_CORES, os.cpu_count() or 1,
        )  # fmt: skip
        _quantize_default(out, plan)
    return out


def _quantize_default(out: Path, plan) -> None:
    from owq.quantizer.api import quantize
    from owq.quantizer.settings import QuantizeSettings

    quantize("default", out, QuantizeSettings(**DEFAULT_SETTINGS), plan=plan, overwrite=True)


def default_adapters_dir() -> Path | None:
    """`examples/adapters/` in the working dir or the source tree, if there (used without
    --adapters)."""
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = root / "examples" / "adapters"
        if candidate.is_dir():
            return candidate
    return None
