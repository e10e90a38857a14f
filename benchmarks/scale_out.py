"""Scale-out benchmark: `owq serve --ray` with 1 vs 2 engine replicas (1 CPU each), and adapter
loads under multiplexed (adapter-affinity) vs round-robin routing.

Throughput: 16 streaming clients, client i on adapter i of 16 (every adapter warmed first), 1
replica vs 2; aggregate tokens/s and p99 time to first token. Floor: 2 replicas >= 1.6x one.
Adapter loads: 64 adapters, at most 8 per replica, 2 replicas; 16 clients each run 4 sessions
of `--session-requests` short requests on one adapter (client c's session k uses adapter
c + 16k: 16 adapters active at a time, all 64 in turn). Loads are the replicas' own count
(`owq_adapter_load_seconds_count`, summed over the merged /metrics); floor: multiplexed
routing makes >= 4x fewer loads per request (= per minute at equal traffic; the clients are
closed-loop, so per minute would compare unequal traffic) than round-robin routing (each replica
in turn, blind to adapters: a plain balancer in front of plain replicas; a least-loaded one
keeps closed-loop clients like these on one replica by accident). Every configuration is its
own `owq serve --ray` process with its own local Ray instance. Prints a table, checks the
floors, writes JSON. Run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from serving_clients import (
    START_TIMEOUT_S,
    Scenario,
    body,
    histogram_totals,
    make_adapters,
    owq_serve,
    print_table,
    run_clients,
    start_server,
    stop,
)

EXAMPLES = """examples:
  python benchmarks/scale_out.py                                   # the built-in default
  python benchmarks/scale_out.py --quick --ckpt /tmp/tiny/ckpt     # a smoke run
  python benchmarks/scale_out.py --skip-throughput --session-requests 16
"""

LOADS_METRIC = "owq_adapter_load_seconds"  # a histogram: _count loads, _sum their seconds


@dataclass
class LoadRun:
    routing: str
    adapters: int
    per_replica: int
    requests: int = 0
    errors: int = 0
    wall_s: float = 0.0
    loads: int = 0
    loads_per_min: float = 0.0
    load_s_mean: float = 0.0  # what a request on a cold adapter waits before its prefill


def owq_ray(ckpt: Path, adapters: Path, replicas: int, per_replica: int, routing: str, log):
    flags = f"--ray --ray-replicas {replicas} --ray-cpus-per-replica 1 --ray-routing {routing}"
    flags += f" --ray-max-adapters-per-replica {per_replica}"
    cmd = [*owq_serve(ckpt, adapters), *flags.split()]
    proc, url = start_server(cmd, "/ready", START_TIMEOUT_S, log)
    try:
        wait_replicas(url, replicas)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def wait_replicas(url: str, count: int, timeout_s: float = START_TIMEOUT_S) -> None:
    """Until /ready names `count` ready replicas (it answers as soon as one is)."""
    deadline = time.monotonic() + timeout_s
    while True:
        ready = httpx.get(f"{url}/ready", timeout=60)
        if len(ready.headers.get("x-owq-replicas", "").split(",")) >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not {count} ready replicas after {timeout_s} s: {ready.text}")
        time.sleep(1.0)


def adapter_loads(url: str) -> tuple[int, float]:
    """(adapter loads, their seconds) summed over the replicas of the merged /metrics."""
    seconds, count = histogram_totals(url, LOADS_METRIC).get(None, (0.0, 0.0))
    return int(count), seconds


def warm(url: str, names: list[str]) -> None:
    """One short request per adapter (loads them where the router puts them)."""
    for name in names:
        r = httpx.post(
            f"{url}/v1/completions", json=body(0, 2, name) | {"stream": False}, timeout=600
        )
        r.raise_for_status()


def throughput(args, ckpt: Path, names: list[str], adapters: Path, log) -> list[Scenario]:
    out = []
    for replicas in (1, 2):
        proc, url = owq_ray(ckpt, adapters, replicas, len(names), "multiplexed", log)
        try:
            warm(url, names)
            sc = Scenario(f"ray {replicas} replica(s), 16 adapters", "owq-ray", 16, len(names))
            bodies = [body(i, args.max_tokens, names[i]) for i in range(16)]
            out.append(asyncio.run(run_clients(url, sc, bodies, args.per_client)))
        finally:
            stop(proc)
    return out


async def split_clients(urls: list[str], bodies: list[dict], per_client: int) -> Scenario:
    """16 clients split evenly over the servers at `urls`; one aggregate row."""
    n = len(urls)
    parts = [Scenario(f"part {i}", "owq", len(bodies) // n, len(bodies) // n) for i in range(n)]
    start = time.perf_counter()
    runs = [run_clients(urls[i], parts[i], bodies[i::n], per_client) for i in range(n)]
    await asyncio.gather(*runs)
    sc = Scenario(f"plain {n} process(es), 1 thread each", "owq", len(bodies), len(bodies))
    sc.wall_s = time.perf_counter() - start
    sc.requests, sc.tokens = sum(p.requests for p in parts), sum(p.tokens for p in parts)
    sc.tokens_per_s = sc.tokens / sc.wall_s
    sc.ttft_p99_ms = max(p.ttft_p99_ms for p in parts)
    sc.errors = [e for p in parts for e in p.errors]
    return sc


def plain(args, ckpt: Path, names: list[str], adapters: Path, log) -> list[Scenario]:
    """The same load on plain `owq serve` processes without Ray, 1 vs 2, one thread each: what
    this machine gives two engines when nothing routes their tokens."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = owq_serve(ckpt, adapters)
    out = []
    for count in (1, 2):
        procs, urls = [], []
        try:
            for _ in range(count):
                proc, url = start_server(cmd, "/ready", START_TIMEOUT_S, log, env=env)
                procs.append(proc)
                urls.append(url)
                warm(url, names)
            bodies = [body(i, args.max_tokens, names[i]) for i in range(16)]
            out.append(asyncio.run(split_clients(urls, bodies, args.per_client)))
        finally:
            for proc in procs:
                stop(proc)
    return out


async def session_client(client: httpx.AsyncClient, url: str, c: int, names, args) -> list[int]:
    statuses = []
    for k in range(4):
        name = names[(c + 16 * k) % len(names)]
        for j in range(args.session_requests):
            payload = body(c + j, args.session_tokens, name) | {"stream": False}
            r = await client.post(f"{url}/v1/completions", json=payload)
            statuses.append(r.status_code)
    return statuses


async def sessions(url: str, names: list[str], args) -> tuple[list[int], float]:
    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        runs = await asyncio.gather(
            *(session_client(client, url, c, names, args) for c in range(16))
        )
        return [s for run in runs for s in run], time.perf_counter() - start


def loads(args, ckpt: Path, names: list[str], adapters: Path, log) -> list[LoadRun]:
    out = []
    for routing in ("multiplexed", "round-robin"):
        run = LoadRun(routing, len(names), args.per_replica)
        proc, url = owq_ray(ckpt, adapters, 2, args.per_replica, routing, log)
        try:
            loads_before, seconds_before = adapter_loads(url)
            statuses, run.wall_s = asyncio.run(sessions(url, names, args))
            loads_after, seconds_after = adapter_loads(url)
            run.loads = loads_after - loads_before
            run.load_s_mean = (seconds_after - seconds_before) / max(run.loads, 1)
        finally:
            stop(proc)
        run.requests, run.errors = len(statuses), sum(s != 200 for s in statuses)
        run.loads_per_min = run.loads / (run.wall_s / 60)
        out.append(run)
    return out


def floors(scenarios: list[Scenario], runs: list[LoadRun]) -> list[dict]:
    rows = []
    if len(scenarios) >= 2 and scenarios[0].tokens_per_s:
        ratio = scenarios[1].tokens_per_s / scenarios[0].tokens_per_s
        rows.append(
            {"floor": "2 replicas >= 1.6x one (tokens/s)", "value": ratio, "ok": ratio >= 1.6}
        )
    if len(runs) == 2 and runs[0].loads:
        ratio = per_request(runs[1]) / per_request(runs[0])
        floor = "multiplexed >= 4x fewer loads per request (per minute at equal traffic)"
        rows.append({"floor": floor, "value": ratio, "ok": ratio >= 4})
    return rows


def per_request(run: LoadRun) -> float:
    """Loads per request. The clients are closed-loop, so a routing that answers faster is sent
    more requests a minute: loads per minute compare routings at unequal traffic."""
    return run.loads / max(run.requests, 1)


def print_loads(runs: list[LoadRun]) -> None:
    print(f"{'routing':<15} {'adapters':>8} {'/replica':>8} {'reqs':>5} {'err':>4} "
          f"{'wall s':>7} {'loads':>6} {'/1k req':>7} {'loads/min':>9} {'load ms':>8}")  # fmt: skip
    for r in runs:
        print(f"{r.routing:<15} {r.adapters:>8} {r.per_replica:>8} {r.requests:>5} {r.errors:>4} "
              f"{r.wall_s:>7.1f} {r.loads:>6} {1e3 * per_request(r):>7.1f} "
              f"{r.loads_per_min:>9.1f} {1e3 * r.load_s_mean:>8.1f}")  # fmt: skip
    if len(runs) == 2 and runs[0].loads_per_min:
        ratio = runs[1].loads_per_min / runs[0].loads_per_min
        print(f"loads per minute, round-robin / multiplexed: {ratio:.2f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", type=Path, default=None, help="default: the built-in default")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per throughput request")
    p.add_argument("--per-client", type=int, default=4, help="throughput requests per client")
    p.add_argument("--adapters", type=int, default=64, help="adapters of the loads part")
    p.add_argument("--per-replica", type=int, default=8, help="adapters a replica holds")
    p.add_argument("--session-requests", type=int, default=8, help="requests per session")
    p.add_argument("--session-tokens", type=int, default=4, help="tokens per session request")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-loads", action="store_true")
    p.add_argument(
        "--plain", action="store_true", help="also 1 vs 2 plain owq serve processes, no Ray"
    )
    p.add_argument("--quick", action="store_true", help="few tokens and requests (a smoke run)")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/scale_out.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.max_tokens, args.per_client, args.session_requests = 8, 1, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ckpt is None:
        from owq.default_checkpoint import default_checkpoint

        args.ckpt = default_checkpoint()
    load_before = os.getloadavg()
    scenarios, runs = [], []
    with tempfile.TemporaryDirectory(prefix="owq-scale-out-") as tmp:
        names = make_adapters(args.ckpt, Path(tmp) / "adapters", args.adapters)
        log = open(Path(tmp) / "server.log", "w")  # noqa: SIM115 (kept open for the servers)
        try:
            if not args.skip_throughput:
                scenarios = throughput(args, args.ckpt, names[:16], Path(tmp) / "adapters", log)
            if args.plain:
                scenarios += plain(args, args.ckpt, names[:16], Path(tmp) / "adapters", log)
            if not args.skip_loads:
                runs = loads(args, args.ckpt, names, Path(tmp) / "adapters", log)
        finally:
            log.close()
            server_log = (Path(tmp) / "server.log").read_text()[-4000:]
    notes = [f"load average before {load_before}, after {os.getloadavg()}"]
    print_table(scenarios, notes)
    print_loads(runs)
    checked = floors(scenarios, runs)
    for row in checked:
        print(f"floor: {row['floor']}: {row['value']:.2f} {'ok' if row['ok'] else 'MISSED'}")
    result = {
        "ckpt": str(args.ckpt), "argv": sys.argv[1:], "cpu_count": os.cpu_count(),
        "machine": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "scenarios": [asdict(s) for s in scenarios], "loads": [asdict(r) for r in runs],
        "floors": checked, "server_log_tail": server_log,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0 if all(r["ok"] for r in checked) else 1


if __name__ == "__main__":
    sys.exit(main())
