"""`owq serve --device cuda` end to end (`pytest -m cuda` on a GPU): the real command in a
subprocess, driven by the openai client with mixed adapters in one batch, greedy tokens equal to
those of `owq serve --device cpu` on the same checkpoint.

The CPU server runs the fp32 kernels (`--cpu-decode fp32`); the GPU one fp16. Greedy tokens must
match until the first step where the CPU's two best tokens are within NEAR_TIE in logprob (from
there both continuations are right and the texts may part). The tiny checkpoint is made in the
test; the default model's variant is also `slow` (it quantizes the default once, cached in
$OWQ_CACHE).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from engine_fixtures import build_tiny_server_assets
from serving_clients import start_server, stop

pytestmark = pytest.mark.cuda
NEAR_TIE = 0.05  # logprob margin under which greedy choices may differ between fp16 and fp32
PROMPTS = ["It is a truth", "Emma Woodhouse, handsome,", "The", "Sir Walter Elliot"]
START_TIMEOUT_S = 1800  # the default model is quantized on the first start


@pytest.fixture(autouse=True)
def _gpu_or_skip():
    from owq.kernels import cuda_ops

    if not torch.cuda.is_available() or not cuda_ops.available():
        pytest.skip("needs an NVIDIA GPU and CuPy (pip install owq[cuda])")


def serve(ckpt: Path | None, adapters: Path, device: str, log):
    """(process, url) of `owq serve` on a free port, ready."""
    cmd = ["owq", "serve"] + ([str(ckpt)] if ckpt else []) + ["--adapters", str(adapters)]
    cmd += ["--device", device, "--max-batch", "8", "--cpu-decode", "fp32"]
    return start_server(cmd, "/ready", START_TIMEOUT_S, log)


def greedy(url: str, max_tokens: int) -> dict:
    """{(model, prompt): logprobs} at temperature 0 for the base and every adapter the server
    lists, all requests at once (one mixed batch)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    models = [m.id for m in client.models.list().data]
    assert len(models) >= 4, models  # the base and three adapters
    requests = [(m, p) for m in models for p in PROMPTS]

    def one(request):
        model, prompt = request
        done = client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=2
        )
        return done.choices[0].logprobs

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return dict(zip(requests, pool.map(one, requests), strict=True))


def assert_same_greedy_tokens(cuda, cpu, request) -> None:
    for step, (a, b) in enumerate(zip(cuda.tokens, cpu.tokens, strict=False)):
        if a != b:
            best = sorted(cpu.top_logprobs[step].values(), reverse=True)
            margin = best[0] - best[1] if len(best) > 1 else float("inf")
            assert margin < NEAR_TIE, f"{request}: step {step}: cuda {a!r}, cpu {b!r} ({margin})"
            return
    assert len(cuda.tokens) == len(cpu.tokens), request


def compare_servers(ckpt: Path | None, adapters: Path, tmp_path: Path) -> None:
    results = {}
    with open(tmp_path / "servers.log", "w") as log:
        for device in ("cuda", "cpu"):
            proc, url = serve(ckpt, adapters, device, log)
            try:
                results[device] = greedy(url, max_tokens=16)
            finally:
                stop(proc)
    assert results["cuda"].keys() == results["cpu"].keys()
    for request, cuda in results["cuda"].items():
        assert_same_greedy_tokens(cuda, results["cpu"][request], request)


def test_tiny_checkpoint_cuda_server_matches_cpu_server(tmp_path):
    ckpt, adapters = build_tiny_server_assets(tmp_path, kind="llama", num_adapters=3)
    compare_servers(ckpt, adapters, tmp_path)


@pytest.mark.slow
def test_default_checkpoint_cuda_server_matches_cpu_server(tmp_path):
    """The built-in default (quantized once into $OWQ_CACHE) with three random adapters."""
    from serving_clients import make_adapters

    from owq.default_checkpoint import default_checkpoint

    make_adapters(default_checkpoint(), tmp_path / "adapters", 3)
    compare_servers(None, tmp_path / "adapters", tmp_path)
