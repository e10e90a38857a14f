"""Streaming clients and server processes shared by the serving benchmarks.

A `Scenario` is N concurrent clients streaming `/v1/completions` (each token timed: TTFT,
inter-token gaps); `start_server` runs `python -m <module> --port P` (owq serve, or llama-cpp-
python's server from another interpreter) and waits until it answers; `make_adapters` writes
random weak-column adapters for a checkpoint's base. No scenario logic, no floors.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

PROMPTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement,",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition,",
    "No one who had ever seen Catherine Morland in her infancy would have supposed her born to be",
]
START_TIMEOUT_S = 1800  # the first start may quantize the default model


@dataclass
class Stream:
    ttft: float
    gaps: list[float]
    tokens: int


@dataclass
class Scenario:
    name: str
    server: str
    clients: int
    adapters: int
    requests: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    ttft_p50_ms: float = 0.0
    ttft_p99_ms: float = 0.0
    itl_p50_ms: float = 0.0
    itl_p99_ms: float = 0.0
    decode_tokens_per_s: float = 0.0  # per stream: 1 / mean inter-token gap, median over streams
    errors: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_stream(client: httpx.AsyncClient, url: str, body: dict) -> Stream:
    """One streamed request. A chunk is a token when it has text or no finish reason (a token
    whose text is not out yet, e.g. an end-of-sequence token past `ignore_eos`, still took its
    step); a closing chunk without text is not. The count is the server's usage where it sends
    one (`stream_options`; llama-cpp-python ignores the field)."""
    start = time.perf_counter()
    stamps: list[float] = []
    used = None
    body = body | {"stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            used = (chunk.get("usage") or {}).get("completion_tokens", used)
            for choice in chunk.get("choices") or ():
                if choice.get("text") or not choice.get("finish_reason"):
                    stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("the stream had no tokens")
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return Stream(stamps[0] - start, gaps, len(stamps) if used is None else used)


async def run_clients(url: str, scenario: Scenario, bodies: list[dict], per_client: int):
    limits = httpx.Limits(max_connections=scenario.clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def client_loop(i: int) -> list[Stream | Exception]:
            out: list[Stream | Exception] = []
            for _ in range(per_client):
                try:
                    out.append(await one_stream(client, url, bodies[i]))
                except Exception as e:  # reported, not fatal
                    out.append(e)
            return out

        start = time.perf_counter()
        results = await asyncio.gather(*(client_loop(i) for i in range(scenario.clients)))
        scenario.wall_s = time.perf_counter() - start
    streams = [s for rs in results for s in rs if isinstance(s, Stream)]
    scenario.errors = sorted(
        {str(e)[:120] for rs in results for e in rs if isinstance(e, Exception)}
    )
    summarize(scenario, streams)
    return scenario


def summarize(scenario: Scenario, streams: list[Stream]) -> None:
    gaps = [g for s in streams for g in s.gaps]
    ttfts = [s.ttft for s in streams]
    rates = [len(s.gaps) / sum(s.gaps) for s in streams if s.gaps and sum(s.gaps) > 0]
    scenario.requests = len(streams)
    scenario.tokens = sum(s.tokens for s in streams)
    scenario.tokens_per_s = scenario.tokens / scenario.wall_s if scenario.wall_s else 0.0
    scenario.ttft_p50_ms, scenario.ttft_p99_ms = (1e3 * percentile(ttfts, q) for q in (50, 99))
    scenario.itl_p50_ms, scenario.itl_p99_ms = (1e3 * percentile(gaps, q) for q in (50, 99))
    scenario.decode_tokens_per_s = statistics.median(rates) if rates else 0.0


def body(
    prompt_i: int,
    max_tokens: int,
    model: str | None = None,
    temperature: float = 0.8,
    extra: dict | None = None,
) -> dict:
    """A streamed completion; `extra` adds server-specific fields (`full_length`)."""
    prompt = PROMPTS[prompt_i % len(PROMPTS)]
    out = dict(prompt=prompt, max_tokens=max_tokens, temperature=temperature, seed=prompt_i)
    return out | {"stream": True} | ({"model": model} if model else {}) | (extra or {})


def full_length(server: str, max_tokens: int) -> dict:
    """The fields that make `server` decode all `max_tokens` past EOS, so that loads compare
    equal work: owq's `ignore_eos`, llama-cpp-python's `min_tokens` (which masks EOS)."""
    return {"min_tokens": max_tokens} if server == "llama.cpp" else {"ignore_eos": True}


def histogram_totals(url: str, name: str, by: str | None = None, **match: str) -> dict:
    """{value of label `by` (None: all summed): (seconds, count)} of histogram `name` on
    `url`/metrics, over its samples whose labels have the `match` values (replicas summed)."""
    out: dict = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=60).text):
        for s in family.samples:
            if s.name not in (f"{name}_sum", f"{name}_count"):
                continue
            if any(s.labels.get(k) != v for k, v in match.items()):
                continue
            key = s.labels.get(by) if by else None
            seconds, count = out.get(key, (0.0, 0.0))
            out[key] = (seconds + s.value, count) if s.name.endswith("_sum") else (
                seconds, count + s.value)  # fmt: skip
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}{path}", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def owq_serve(ckpt: Path, adapters: Path, max_batch: int = 16) -> list[str]:
    """The `owq serve` module argv the benchmarks start (no port: `start_server` adds it)."""
    flags = f"--max-batch {max_batch} --max-queue 1024".split()
    return ["owq", "serve", str(ckpt), "--adapters", str(adapters), "--host", "127.0.0.1", *flags]


def start_server(
    cmd: list[str], ready_path: str, timeout_s: float, log, env=None, python: str = ""
):
    """Start `python -m <cmd> --port P` (this interpreter unless `python` names another; in
    `env`, default ours) and wait until `ready_path` answers 200."""
    port = free_port()
    argv = [python or sys.executable, "-m", *cmd, "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url, proc, ready_path, timeout_s)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def make_adapters(
    ckpt: Path, out: Path, count: int, seed: int = 0, scale: float = 0.1
) -> list[str]:
    """`count` random weak-column adapters of the checkpoint's base (noise of `scale` times
    each layer's own std on its columns)."""
    import torch

    from owq.kernels.adapters import adapter_from_model, save_adapter
    from owq.kernels.checkpoint import load_checkpoint

    base = load_checkpoint(ckpt)
    names = []
    for i in range(count):
        adapter = adapter_from_model(base, f"bench-{i:02d}", task="benchmark")
        gen = torch.Generator().manual_seed(seed + i)
        for layer, cols in adapter.columns.items():
            noise = torch.randn(cols.shape, generator=gen) * scale * cols.float().std()
            adapter.columns[layer] = (cols.float() + noise).to(torch.float16)
        save_adapter(adapter, out / adapter.name)
        names.append(adapter.name)
    return names


def print_table(scenarios: list[Scenario], notes: list[str]) -> None:
    head = f"{'scenario':<36} {'reqs':>5} {'tok':>6} {'tok/s':>8} {'ttft p50':>9} {'p99':>8} "
    print(head + f"{'itl p50':>8} {'p99':>8} {'dec tok/s':>9}  (ms)")
    for s in scenarios:
        print(
            f"{s.name:<36} {s.requests:>5} {s.tokens:>6} {s.tokens_per_s:>8.1f} "
            f"{s.ttft_p50_ms:>9.1f} {s.ttft_p99_ms:>8.1f} {s.itl_p50_ms:>8.1f} "
            f"{s.itl_p99_ms:>8.1f} {s.decode_tokens_per_s:>9.1f}"
        )
        for e in s.errors:
            print(f"    error: {e}")
    for note in notes:
        print(f"note: {note}")
