"""Compile check of every `kernels/*.cu` with nvcc for sm_80 and sm_90 (no GPU needed).

Uses `cuda_ops.COMPILE_OPTIONS` (what CuPy's RawModule is given) plus warnings-as-errors for the
front end and ptxas (spills and local memory count as warnings), and checks that every kernel
name `cuda_ops` loads is defined. nvcc is required: dev machines and CI have it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from owq.kernels import cuda_ops

KERNEL_DIR = Path(cuda_ops.__file__).parent
SOURCES = sorted(KERNEL_DIR.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
STRICT_FLAGS = (
    "-Werror",
    "all-warnings",
    "-Xptxas",
    "-v,-warn-spills,-warn-lmem-usage,--warning-as-error",
)
VARIANTS = ("vec", "any")
EXPECTED_KERNELS = {
    "dequant_gemv.cu": [f"dequant_gemv_{b}_{rows}_vec" for b in (2, 3, 4) for rows in (1, 2, 4, 8)]
    + [f"dequant_gemv_{b}_{rows}_any" for b in (2, 3, 4) for rows in (1, 8)]
    + [f"dequantize_fp16_{b}_{v}" for b in (2, 3, 4) for v in VARIANTS],
    "weak_sgmv.cu": [f"weak_columns_sgmv_{v}" for v in VARIANTS],
}


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.fail(
            "nvcc is required for the CUDA kernel compile check (install the CUDA toolkit and put "
            "nvcc on PATH; the dev machines and CI have it)",
            pytrace=False,
        )
    return nvcc


def _compile(
    nvcc: str, source: Path, arch: str, out_dir: Path
) -> tuple[list[str], subprocess.CompletedProcess]:
    cubin = out_dir / f"{source.stem}_{arch}.cubin"
    cmd = [
        nvcc,
        *cuda_ops.COMPILE_OPTIONS,
        f"-arch={arch}",
        "-cubin",
        *STRICT_FLAGS,
        "-o",
        str(cubin),
        str(source),
    ]
    return cmd, subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_every_source_is_loaded_by_cuda_ops():
    assert {p.name for p in SOURCES} == set(cuda_ops.KERNEL_SOURCES) == set(EXPECTED_KERNELS)


def test_kernels_compile_without_warnings(tmp_path):
    nvcc = _nvcc()
    jobs = [(source, arch) for source in SOURCES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _compile(nvcc, *job, tmp_path), jobs))
    errors = []
    for (source, arch), (cmd, proc) in zip(jobs, results, strict=True):
        log = proc.stdout + proc.stderr
        noisy = [line for line in log.splitlines() if re.search(r"warning|error", line, re.I)]
        if proc.returncode or noisy:
            errors.append(f"{source.name} [{arch}] rc={proc.returncode}: {' '.join(cmd)}\n{log}")
            continue
        compiled = set(re.findall(r"Compiling entry function '(\w+)'", log))
        missing = sorted(set(EXPECTED_KERNELS[source.name]) - compiled)
        if missing:
            errors.append(f"{source.name} [{arch}] does not define {missing}")
    assert not errors, "\n\n".join(errors)
