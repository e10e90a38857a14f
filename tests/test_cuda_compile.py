"""Compile checks of every `kernels/*.cu` (no GPU needed): nvcc with ptxas for sm_80 and sm_90,
and NVRTC, the front end CuPy's RawModule really uses, from its pip wheel.

Both use `cuda_build.compile_options(act)` (`-std=c++17 -I<kernels dir>`, plus `-DOWQ_ACT_BF16`
for the bf16 module): the same include path CuPy is given, so `owq_cuda.cuh` is found the same
way. nvcc adds warnings-as-errors for the front end and ptxas (spills and local memory count);
NVRTC must compile without a warning. Both check that every kernel name `cuda_ops` can ask for
is defined. nvcc is required (dev machines and CI have it). NVRTC comes from `NVRTC_WHEEL`, the
one constant to change with the CUDA line: the version torch 2.13.0's CUDA 13 build pins, which
`cupy-cuda13x` then loads. It is installed once into the owq cache (`$OWQ_CACHE`, default
~/.cache/owq; ~60 MB download) when the environment lacks it; the NVRTC test is skipped, saying
so, only where that install fails (no package index).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from owq.kernels import cuda_build, cuda_ops

NVRTC_WHEEL = "nvidia-cuda-nvrtc==13.0.88"  # torch 2.13.0 (CUDA 13) pins it; cupy-cuda13x loads it
SOURCES = sorted(cuda_build.KERNEL_DIR.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
ACTS = (torch.float16, torch.bfloat16)
PTXAS_STRICT = "-v,-warn-spills,-warn-lmem-usage,--warning-as-error"
STRICT_FLAGS = ("-Werror", "all-warnings", "-Xptxas", PTXAS_STRICT)
VARIANTS = ("vec", "any")
EXPECTED_KERNELS = {
    "dequant_gemv.cu": [f"dequant_gemv_{b}_{rows}_vec" for b in (2, 3, 4) for rows in (1, 2, 4, 8)]
    + [f"dequant_gemv_{b}_{rows}_any" for b in (2, 3, 4) for rows in (1, 8)]
    + [f"dequantize_{b}_{v}" for b in (2, 3, 4) for v in VARIANTS],
    "weak_sgmv.cu": [f"weak_columns_sgmv_{v}" for v in VARIANTS],
}
JOBS = [(source, arch, act) for source in SOURCES for arch in ARCHS for act in ACTS]


def test_every_source_is_loaded_by_cuda_ops():
    assert {p.name for p in SOURCES} == set(cuda_build.KERNEL_SOURCES) == set(EXPECTED_KERNELS)
    for name in cuda_build.KERNEL_SOURCES:
        assert cuda_build.kernel_source(name).headers() == cuda_build.KERNEL_HEADERS


def test_unavailable_without_gpu():
    if not torch.cuda.is_available():
        assert not cuda_ops.available()


# nvcc ------------------------------------------------------------------------------------------
def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.fail(
            "nvcc is required for the CUDA kernel compile check (install the CUDA toolkit and put "
            "nvcc on PATH; the dev machines and CI have it)",
            pytrace=False,
        )
    return nvcc


def _nvcc_compile(nvcc: str, job, out_dir: Path) -> tuple[list[str], subprocess.CompletedProcess]:
    source, arch, act = job
    cubin = out_dir / f"{source.stem}_{arch}_{str(act)[6:]}.cubin"
    options = cuda_build.compile_options(act)
    cmd = [nvcc, *options, f"-arch={arch}", "-cubin", *STRICT_FLAGS, "-o", str(cubin), str(source)]
    return cmd, subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_kernels_compile_with_nvcc_without_warnings(tmp_path):
    nvcc = _nvcc()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _nvcc_compile(nvcc, job, tmp_path), JOBS))
    errors = []
    for (source, arch, act), (cmd, proc) in zip(JOBS, results, strict=True):
        log = proc.stdout + proc.stderr
        noisy = [line for line in log.splitlines() if re.search(r"warning|error", line, re.I)]
        if proc.returncode or noisy:
            errors.append(
                f"{source.name} [{arch} {act}] rc={proc.returncode}: {' '.join(cmd)}\n{log}"
            )
            continue
        compiled = set(re.findall(r"Compiling entry function '(\w+)'", log))
        missing = sorted(set(EXPECTED_KERNELS[source.name]) - compiled)
        if missing:
            errors.append(f"{source.name} [{arch} {act}] does not define {missing}")
    assert not errors, "\n\n".join(errors)


# NVRTC -----------------------------------------------------------------------------------------
def _nvrtc_dir() -> Path:
    """The lib/ folder of NVRTC_WHEEL: in this environment, else installed once into the cache."""
    name, version = NVRTC_WHEEL.split("==")
    try:
        if importlib.metadata.version(name) == version:
            files = importlib.metadata.files(name) or []
            lib = next(f for f in files if f.name.startswith("libnvrtc.so."))
            return Path(lib.locate()).parent
    except (importlib.metadata.PackageNotFoundError, StopIteration):
        pass
    cache = Path(os.environ.get("OWQ_CACHE", Path.home() / ".cache" / "owq")) / "nvrtc" / version
    if not cache.is_dir():
        _install(cache)
    return next(cache.glob("nvidia/*/lib/libnvrtc.so.*")).parent


def _install(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".nvrtc-", dir=target.parent))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp)]
    proc = subprocess.run([*cmd, NVRTC_WHEEL], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"cannot install {NVRTC_WHEEL} for the NVRTC check: {proc.stderr[-300:]}")
    tmp.rename(target)


def _load_nvrtc(lib_dir: Path) -> ctypes.CDLL:
    for builtins in sorted(lib_dir.glob("libnvrtc-builtins.so.*")):  # dlopen'ed by NVRTC by name
        if ".alt." not in builtins.name:
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    libs = [p for p in sorted(lib_dir.glob("libnvrtc.so.*")) if ".alt." not in p.name]
    return ctypes.CDLL(str(libs[0]))


def _nvrtc_compile(lib, source: Path, arch: str, act) -> tuple[int, str, set[str]]:
    """(status, log, .entry names of the PTX) of one NVRTC compile, as CuPy would run it."""
    c = ctypes
    code = cuda_build.kernel_source(source.name).code.encode()
    prog = c.c_void_p()
    assert lib.nvrtcCreateProgram(c.byref(prog), code, source.name.encode(), 0, None, None) == 0
    options = [*cuda_build.compile_options(act), f"--gpu-architecture={arch}"]
    encoded = (c.c_char_p * len(options))(*[o.encode() for o in options])
    status = lib.nvrtcCompileProgram(prog, len(options), encoded)
    size = c.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, c.byref(size))
    log = c.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcGetPTXSize(prog, c.byref(size))
    ptx = c.create_string_buffer(size.value)
    if status == 0:
        lib.nvrtcGetPTX(prog, ptx)
    lib.nvrtcDestroyProgram(c.byref(prog))
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx.value.decode()))
    return status, log.value.decode(errors="replace"), entries


def test_kernels_compile_with_nvrtc_without_warnings():
    lib = _load_nvrtc(_nvrtc_dir())
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    assert f"{major.value}.{minor.value}" == ".".join(NVRTC_WHEEL.split("==")[1].split(".")[:2])
    jobs = [(source, "compute_80", act) for source in SOURCES for act in ACTS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _nvrtc_compile(lib, *job), jobs))
    errors = []
    for (source, arch, act), (status, log, entries) in zip(jobs, results, strict=True):
        missing = sorted(set(EXPECTED_KERNELS[source.name]) - entries)
        if status or missing or re.search(r"warning|error", log, re.I):
            errors.append(f"{source.name} [{arch} {act}] status={status} missing={missing}\n{log}")
    assert not errors, "\n\n".join(errors)
