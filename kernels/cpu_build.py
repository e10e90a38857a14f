"""The compiled CPU module: `cpu_decode.cpp` (the fused step through every block) and
`cpu_gemm16.cpp` (the 16-bit GEMM), built as one module.

`load()` builds the C++ sources once per machine with torch's extension builder (a C++ compiler
and ninja; about 30 s, for the CPU's instruction level: `flags`), kept in torch's extension
cache (`TORCH_EXTENSIONS_DIR`, rebuilt when a source changes), and returns the module; None,
with one warning, where it cannot be built or `OWQ_CPU_DECODE=0` turns it off. A module built
ahead from these sources is imported as it is from `OWQ_CPU_DECODE_LIB` (the CPU image has no
compiler). `gemm16()` is the module where the 16-bit GEMM runs on this CPU (AVX2 and FMA, or
AVX-512 VNNI) and is wanted (`OWQ_CPU_GEMM=bf16` turns it off). Knows how to build and find the
module; nothing about layers or models.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import platform
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCES = [HERE / "cpu_decode.cpp", HERE / "cpu_gemm16.cpp"]  # one module
SWITCH = "OWQ_CPU_DECODE"  # "0": no compiled module (the eager blocks, torch's kernels)
PREBUILT = "OWQ_CPU_DECODE_LIB"  # a module built ahead from these sources (the CPU image's)
GEMM = "OWQ_CPU_GEMM"  # "bf16": torch's 4-bit kernel; "vnni", "avx2": the 16-bit GEMM capped


def enabled() -> bool:
    return os.environ.get(SWITCH, "1") != "0"


def wide() -> bool:
    """An x86 CPU where torch runs AVX2 or wider: the level `flags` builds for."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def flags() -> list[str]:
    """x86-64-v3 (AVX2, FMA, F16C) where `wide`, never `-march=native`: a build kept in a shared
    cache or an image may run on another CPU of that level; elsewhere portable C++ (the fp16
    loads take the scalar path). OpenMP where torch has it, so that `at::parallel_for` runs on
    torch's threads (the loader finds torch's own libgomp.so.1 already loaded)."""
    omp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    return ["-O3", "-fopenmp-simd", *omp] + (["-march=x86-64-v3"] if wide() else [])


def _import(path: str):
    """A module built ahead, imported as it is (refused on a CPU below the level it needs)."""
    if platform.machine().lower() in ("x86_64", "amd64") and not wide():
        raise RuntimeError("built for x86-64-v3 (AVX2); this CPU runs torch below it")
    spec = importlib.util.spec_from_file_location("owq_cpu_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stale_lock(directory: Path, minutes: float = 10) -> None:
    """torch's builder waits forever on a lock a killed build left behind: one older than any
    build takes is removed, with a warning."""
    lock = directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > 60 * minutes:
        log.warning("removing %s, left by a build killed %.0f min ago", lock, age / 60)
        lock.unlink(missing_ok=True)


@functools.cache
def load():
    """The compiled module, built on first use; None where it cannot be (logged once)."""
    if not enabled():
        return None
    prebuilt = os.environ.get(PREBUILT)
    if prebuilt and Path(prebuilt).is_file():
        try:
            return _import(prebuilt)
        except Exception as e:  # another CPU level, another torch: the eager blocks serve
            log.warning("compiled CPU module %s unusable (%s): the eager blocks serve",
                        prebuilt, e)  # fmt: skip
            return None
    from torch.utils import cpp_extension

    log.info(
        "loading the compiled CPU module: fused decode step, 16-bit GEMM (built once per "
        "machine, ~30 s)"
    )
    try:
        _stale_lock(Path(cpp_extension._get_build_directory("owq_cpu_decode", False)))
        cflags = flags()
        ldflags = ["-fopenmp"] if "-fopenmp" in cflags else []
        return cpp_extension.load(
            "owq_cpu_decode",
            [str(p) for p in SOURCES],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
        )
    except Exception as e:  # no compiler, no ninja, a failed build: the eager blocks serve
        log.warning("compiled CPU module unavailable (%s): the eager blocks serve", e)
        return None


def gemm16():
    """The module where the 16-bit GEMM runs on this CPU (AVX2 and FMA, or AVX-512 VNNI) and
    `OWQ_CPU_GEMM` does not say `bf16`; None otherwise (torch's 4-bit kernel serves)."""
    if os.environ.get(GEMM, "int16") == "bf16":
        return None
    module = load()
    if module is None or not hasattr(module, "gemm16_supported"):
        return None
    return module if module.gemm16_supported() else None
