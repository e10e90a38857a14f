"""Ray Serve reads its settings when first imported: owq's (`server/ray_env.py`) are set before
any test module imports it. `fast_kernel`: a test run once on each CPU fast kernel."""

import importlib.util

import pytest

from owq.kernels import cpu_build

if importlib.util.find_spec("ray") is not None:
    from owq.server import ray_env

    ray_env.configure(local=True)


@pytest.fixture(params=["int4", "int16"])
def fast_kernel(request, monkeypatch):
    """Each CPU fast kernel in turn, for plans made under it: torch's 4-bit kernel
    (`OWQ_CPU_GEMM=bf16`) and the 16-bit GEMM (on CPUs with AVX2 and FMA: skipped elsewhere)."""
    if request.param == "int4":
        monkeypatch.setenv(cpu_build.GEMM, "bf16")
    else:
        monkeypatch.delenv(cpu_build.GEMM, raising=False)
        if cpu_build.gemm16() is None:
            pytest.skip("the 16-bit GEMM needs AVX2 and FMA (and the compiled module)")
    return request.param
