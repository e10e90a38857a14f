"""Serving benchmark: `owq serve` under 1, 4 and 16 concurrent streaming clients, one adapter vs
16 distinct adapters, against transformers `generate` (float model, batch 1; alternated with
single owq requests, round by round) and llama-cpp-python's OpenAI-compatible server on the same
GGUF file.

Every server runs as its own process (`python -m owq serve`, `python -m llama_cpp.server`); the
clients stream `/v1/completions` with httpx and time each token (TTFT, inter-token latency).
Prints a table, checks the floors, writes JSON. Run it alone: it uses every core.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

EXAMPLES = """examples:
  python benchmarks/serving.py                       # the full run on the default checkpoint
  python benchmarks/serving.py --quick               # a smoke run: few tokens, 1 and 4 clients
  python benchmarks/serving.py --ckpt ckpt/owq-3 --max-tokens 128 --no-llama-cpp
  python benchmarks/serving.py --quick --ckpt /tmp/tiny/ckpt --no-transformers --no-llama-cpp
"""

PROMPTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement,",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition,",
    "No one who had ever seen Catherine Morland in her infancy would have supposed her born to be",
]
START_TIMEOUT_S = 1800  # the first start may quantize the default model
SETTLE_S = 1.0  # between the two sides of a round: the last one's OpenMP threads stop spinning


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
    start = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("text"):  # one chunk per token; the closing chunk may be empty
                stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("the stream had no tokens")
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return Stream(stamps[0] - start, gaps, len(stamps))


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


def body(prompt_i: int, max_tokens: int, model: str | None = None) -> dict:
    prompt = PROMPTS[prompt_i % len(PROMPTS)]
    out = dict(prompt=prompt, max_tokens=max_tokens, temperature=0.8, seed=prompt_i, stream=True)
    return out | ({"model": model} if model else {})


# ---- servers ---------------------------------------------------------------------------------


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


def start_server(cmd: list[str], ready_path: str, timeout_s: float, log, env=None):
    """Start `python -m <cmd> --port P` (in `env`, default ours) and wait until `ready_path`
    answers 200."""
    port = free_port()
    argv = [sys.executable, "-m", *cmd, "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url, proc, ready_path, timeout_s)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def start_owq(ckpt: Path, adapters: Path, max_batch: int, log):
    flags = f"--max-batch {max_batch} --max-queue 1024".split()
    cmd = ["owq", "serve", str(ckpt), "--adapters", str(adapters), *flags]
    return start_server(cmd, "/ready", START_TIMEOUT_S, log)


def start_llama_cpp(gguf: Path, threads: int, log):
    # --interrupt_requests False: queue concurrent requests instead of cutting the running one
    flags = f"--host 127.0.0.1 --n_ctx 2048 --n_threads {threads} --interrupt_requests False"
    flags = flags.split()
    return start_server(["llama_cpp.server", "--model", str(gguf), *flags], "/v1/models", 300, log)


def llama_cpp_missing() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')"
    if importlib.util.find_spec("sse_starlette") is None:
        return "llama-cpp-python is installed without its [server] extra"
    return None


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


# ---- references ------------------------------------------------------------------------------


class TransformersReference:
    """Greedy `generate` on the float default model at batch 1 (loaded once, in this process)."""

    def __init__(self):
        from owq.builtin.model import load_float_model

        self.model, tokenizer = load_float_model("default")
        self.ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
        self.kw = {"do_sample": False, "pad_token_id": tokenizer.eos_token_id}
        self.timed(2)  # warm-up

    def timed(self, n: int) -> float:
        import torch

        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(self.ids, max_new_tokens=n, min_new_tokens=n, **self.kw)
        return time.perf_counter() - start

    def run(self, max_tokens: int) -> tuple[float, float]:
        """(seconds to the first token, decode tokens/s after it) of one request."""
        first, full = self.timed(1), self.timed(max_tokens)
        return first, (max_tokens - 1) / max(full - first, 1e-9)


def interleaved_batch1(url: str, args) -> list[Scenario]:
    """Batch-1 decode of owq and of transformers, alternated request by request for
    `args.rounds` rounds, each side's median: the machine's slow and fast moments fall on both
    (memory bandwidth here swings by a third between seconds, which decides a batch-1 race)."""
    reference = TransformersReference()
    owq = Scenario("owq base, batch 1 (interleaved)", "owq-interleaved", 1, 0)
    hf = Scenario("transformers generate, batch 1", "transformers", 1, 0)
    rounds, hf_rates, hf_ttfts = [], [], []
    for _ in range(args.rounds):
        sc = Scenario("round", "owq", 1, 0)
        time.sleep(SETTLE_S)
        rounds.append(asyncio.run(run_clients(url, sc, [body(0, args.max_tokens)], 1)))
        time.sleep(SETTLE_S)
        first, rate = reference.run(args.max_tokens)
        hf_ttfts.append(first)
        hf_rates.append(rate)
    owq.requests = hf.requests = args.rounds
    owq.tokens = hf.tokens = args.rounds * args.max_tokens
    for key in ("decode_tokens_per_s", "tokens_per_s", "ttft_p50_ms", "itl_p50_ms"):
        setattr(owq, key, statistics.median(getattr(r, key) for r in rounds))
    hf.decode_tokens_per_s = statistics.median(hf_rates)
    hf.ttft_p50_ms = 1e3 * statistics.median(hf_ttfts)
    decode_s = (args.max_tokens - 1) / hf.decode_tokens_per_s
    hf.tokens_per_s = args.max_tokens / (statistics.median(hf_ttfts) + decode_s)
    return [owq, hf]


# ---- the run ---------------------------------------------------------------------------------


def owq_scenarios(args, ckpt: Path, log) -> list[Scenario]:
    counts = (1, 4) if args.quick else (1, 4, 16)
    many, out = counts[-1], []

    def run(name: str, clients: int, adapters: int, models: list[str | None]) -> None:
        bodies = [body(i, args.max_tokens, m) for i, m in enumerate(models)]
        sc = Scenario(name, "owq", clients, adapters)
        out.append(asyncio.run(run_clients(url, sc, bodies, args.per_client)))

    with tempfile.TemporaryDirectory(prefix="owq-bench-adapters-") as tmp:
        names = make_adapters(ckpt, Path(tmp), many)
        proc, url = start_owq(ckpt, Path(tmp), max(16, many), log)
        try:
            asyncio.run(run_clients(url, Scenario("warm-up", "owq", 1, 0), [body(0, 4)], 1))
            for n in counts:
                run(f"owq base, {n} clients", n, 0, [None] * n)
            run(f"owq {many} clients, one adapter", many, 1, [names[0]] * many)
            run(f"owq {many} clients, {many} adapters", many, many, names)
            if not args.no_transformers:
                out += interleaved_batch1(url, args)
        finally:
            stop(proc)
    return out


def llama_cpp_scenarios(args, log) -> tuple[list[Scenario], str | None]:
    missing = llama_cpp_missing()
    if missing:
        return [], missing
    from owq.builtin.model import default_gguf_path

    try:
        proc, url = start_llama_cpp(default_gguf_path(), os.cpu_count() or 1, log)
    except Exception as e:  # a server that does not start is reported, not fatal
        return [], f"llama-cpp-python server did not start: {e}"
    out = []
    try:
        asyncio.run(run_clients(url, Scenario("warm-up", "llama.cpp", 1, 0), [body(0, 4)], 1))
        for n in (1, 4) if args.quick else (1, 16):
            sc = Scenario(f"llama.cpp, {n} clients", "llama.cpp", n, 0)
            bodies = [body(i, args.max_tokens) for i in range(n)]
            out.append(asyncio.run(run_clients(url, sc, bodies, args.per_client)))
    finally:
        stop(proc)
    return out, None


def find(scenarios: list[Scenario], server: str, clients: int, adapters: int = 0):
    for s in scenarios:
        if (s.server, s.clients, s.adapters) == (server, clients, adapters):
            return s
    return None


def floor(name: str, value: float, threshold: float) -> dict:
    return {"floor": name, "value": value, "threshold": threshold, "passed": value >= threshold}


def floors(scenarios: list[Scenario]) -> list[dict]:
    """The three floors of the serving issue, each with its value and threshold."""
    many = max(s.clients for s in scenarios if s.server == "owq")
    one, full = find(scenarios, "owq", 1), find(scenarios, "owq", many)
    same, distinct = find(scenarios, "owq", many, 1), find(scenarios, "owq", many, many)
    reference, rows = find(scenarios, "transformers", 1), []
    if one and full:
        ratio = full.tokens_per_s / max(one.tokens_per_s, 1e-9)
        rows.append(floor(f"{many} clients >= 4x tokens/s of 1 client", ratio, 4.0))
    if same and distinct:
        ratio = distinct.tokens_per_s / max(same.tokens_per_s, 1e-9)
        rows.append(floor(f"{many} distinct adapters >= 0.9x of one adapter", ratio, 0.9))
    batch1 = find(scenarios, "owq-interleaved", 1)
    if batch1 and reference:
        ratio = batch1.decode_tokens_per_s / max(reference.decode_tokens_per_s, 1e-9)
        rows.append(floor("batch-1 decode >= transformers generate (float)", ratio, 1.0))
    return rows


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", type=Path, default=None, help="owq checkpoint (default: built-in)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 and 4 clients, 8 tokens")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per request (64)")
    p.add_argument("--per-client", type=int, default=None, help="requests per client (2)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved batch-1 rounds (5)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers ref")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp reference")
    p.add_argument("--json", type=Path, help="default benchmarks/results/serving(-quick).json")
    args = p.parse_args(argv)
    args.max_tokens = args.max_tokens or (8 if args.quick else 64)
    args.per_client = args.per_client or (1 if args.quick else 2)
    args.rounds = args.rounds or (2 if args.quick else 5)
    results = Path(__file__).resolve().parent / "results"
    args.json = args.json or results / ("serving-quick.json" if args.quick else "serving.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ckpt is None:
        from owq.default_checkpoint import default_checkpoint

        args.ckpt = default_checkpoint()
    notes: list[str] = []
    log_path = Path(tempfile.gettempdir()) / f"owq-{args.json.stem}-servers.log"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        scenarios = owq_scenarios(args, args.ckpt, log)
        if args.no_llama_cpp:
            notes.append("llama.cpp reference skipped (--no-llama-cpp)")
        else:
            llama, missing = llama_cpp_scenarios(args, log)
            scenarios += llama
            if missing:
                notes.append(f"llama.cpp reference unavailable: {missing}")
    rows = floors(scenarios)
    print_table(scenarios, notes)
    for r in rows:
        print(
            f"floor: {r['floor']}: {r['value']:.2f} (>= {r['threshold']}) "
            f"{'PASS' if r['passed'] else 'FAIL'}"
        )
    settings = {k: getattr(args, k) for k in ("quick", "max_tokens", "per_client")}
    report = {
        "ckpt": str(args.ckpt),
        **settings,
        "cpu_count": os.cpu_count(),
        "scenarios": [asdict(s) for s in scenarios],
        "floors": rows,
        "notes": notes,
        "server_log": str(log_path),
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
