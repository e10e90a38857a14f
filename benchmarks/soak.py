"""Soak test of `owq serve`: many clients for minutes, adapters replaced under them, nothing lost.

N clients (default 32) send completions and chat, streamed and not, on the base and on 16
adapters generated for the served base, cancelling some streams midway, each request under a
deadline, for T minutes (default 10); an admin client replaces (files swapped, then reloaded),
unloads and loads adapters every few seconds. Every adapter has two versions whose greedy text
on a probe prompt differs (checked before the load starts), so a probe's text tells which
version served it: it must be one version's whole text, never a mix. That needs a decode whose
tokens do not depend on the batch, so the server decodes with `--cpu-decode fp32` by default;
with `int4` (not batch invariant: tests/test_engine_seeds.py) only the prefix that tells the
versions apart is checked. At the end: every request got a complete result, or a 429/503 with
Retry-After (none lost, none hung, no 5xx); `/metrics` counts exactly the statuses the clients
saw; the running batch is back to 0; the server's RSS is within 10% of its RSS after the
warm-up. All traffic goes to 127.0.0.1. Prints a table, writes JSON, exits 1 when a floor is
broken. The clients are in `soak_clients.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from serving_clients import make_adapters, percentile, start_server, stop
from soak_clients import PROBE, PROBE_TOKENS, VERSIONS, Tally, admin_loop, client_loop, switch

EXAMPLES = """examples:
  python benchmarks/soak.py                          # 32 clients x 10 minutes, default model
  python benchmarks/soak.py --clients 8 --minutes 1 --ckpt /tmp/tiny/ckpt --adapters 4
"""


# ---- adapters with two versions ------------------------------------------------------------


def build_adapters(ckpt: Path, root: Path, count: int, seed: int) -> list[str]:
    """root/<name> -> root/.versions/A/<name> (symlinks; B holds the other version)."""
    names = []
    for i, version in enumerate(VERSIONS):
        names = make_adapters(ckpt, root / ".versions" / version, count, seed + 1000 * i, 1.0)
    for name in names:
        (root / name).symlink_to(Path(".versions") / "A" / name)
    return names


# ---- server state --------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def metric_samples(base: str) -> dict:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    out: dict = {"statuses": Counter(), "running": None}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "owq_requests_total":
                out["statuses"][int(s.labels["status"])] += int(s.value)
            elif s.name == "owq_running_batch_size":
                out["running"] = s.value
    return out


def wait_idle(base: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        now = metric_samples(base)
        if now["running"] == 0 or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def probe_refs(base: str, root: Path, names: list[str]) -> dict[str, dict[str, str]]:
    """Each adapter's probe text per version, served alone; the versions must differ."""
    refs: dict[str, dict[str, str]] = {}
    body = {"prompt": PROBE, "max_tokens": PROBE_TOKENS, "temperature": 0}
    for name in names:
        refs[name] = {}
        for version in (*VERSIONS[1:], VERSIONS[0]):  # ends on A, as the links start
            switch(root, name, version)
            httpx.post(f"{base}/v1/adapters", json={"name": name}, timeout=300).raise_for_status()
            r = httpx.post(f"{base}/v1/completions", json={**body, "model": name}, timeout=300)
            refs[name][version] = r.raise_for_status().json()["choices"][0]["text"]
        if len(set(refs[name].values())) < len(VERSIONS):
            raise RuntimeError(f"{name}: the versions give the same probe text; raise the noise")
    return refs


# ---- the run -------------------------------------------------------------------------------


async def load_phase(base, root, names, refs, seconds: float, args) -> tuple[Tally, Counter]:
    tally, admin = Tally(), Counter()
    end = time.monotonic() + seconds
    loops = [client_loop(i, base, names, refs, end, args, tally) for i in range(args.clients)]
    await asyncio.gather(*loops, admin_loop(base, root, names, end, args, admin))
    return tally, admin


def run(args) -> dict:
    ckpt = Path(args.ckpt) if args.ckpt else default_ckpt()
    with tempfile.TemporaryDirectory(prefix="owq-soak-") as tmp:
        root = Path(tmp) / "adapters"
        names = build_adapters(ckpt, root, args.adapters, args.seed)
        flags = [
            *("--adapters", str(root), "--host", "127.0.0.1", "--max-batch", str(args.max_batch)),
            *("--max-queue", str(args.max_queue), "--max-loaded-adapters", str(args.adapters)),
            *("--cpu-decode", args.cpu_decode),
        ]
        env = dict(os.environ)
        if args.server_threads:
            env["OMP_NUM_THREADS"] = str(args.server_threads)
        with open(Path(tmp) / "server.log", "w") as log:
            cmd = ["owq", "serve", str(ckpt), *flags]
            proc, base = start_server(cmd, "/ready", 1800, log, env)
            try:
                return measure(proc.pid, base, root, names, args)
            finally:
                stop(proc)


def measure(pid: int, base: str, root: Path, names: list[str], args) -> dict:
    """Versions' texts, the warm-up, then the measured load, with the server's state around it."""
    refs = probe_refs(base, root, names)
    asyncio.run(load_phase(base, root, names, refs, args.warmup_s, args))
    before = wait_idle(base)
    rss_warm = rss_bytes(pid)
    start = time.monotonic()
    tally, admin = asyncio.run(load_phase(base, root, names, refs, args.minutes * 60, args))
    wall = time.monotonic() - start
    after = wait_idle(base)
    counted = after["statuses"] - before["statuses"]
    return report(args, tally, admin, counted, after["running"], rss_warm, rss_bytes(pid), wall)


def default_ckpt() -> Path:
    from owq.default_checkpoint import default_checkpoint

    return default_checkpoint()


def report(args, tally: Tally, admin, counted, running, rss_warm, rss_end, wall) -> dict:
    drift = (rss_end - rss_warm) / rss_warm
    seen = {k: v for k, v in tally.statuses.items() if v}
    floors = {
        "no request lost": tally.lost == 0,
        "no request hung": tally.hung == 0,
        "no 5xx": tally.server_errors == 0,
        "every 429/503 has Retry-After": tally.no_retry_after == 0,
        "no other 4xx": tally.client_errors == 0,
        "probes finish on their version": tally.version_mix == 0,
        "/metrics counts what the clients saw": dict(counted) == seen,
        "running batch back to 0": running == 0,
        "RSS drift <= 10%": abs(drift) <= 0.10,
    }
    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "wall_s": round(wall, 1),
        "tally": {k: v for k, v in asdict(tally).items() if k not in ("ttft_s", "statuses")},
        "statuses_seen": {str(k): v for k, v in sorted(seen.items())},
        "statuses_counted": {str(k): v for k, v in sorted(counted.items())},
        "ttft_p50_ms": round(1e3 * percentile(tally.ttft_s, 50), 1),
        "ttft_p99_ms": round(1e3 * percentile(tally.ttft_s, 99), 1),
        "admin": dict(admin),
        "running_batch_after": running,
        "rss_after_warmup_mib": round(rss_warm / 2**20, 1),
        "rss_after_run_mib": round(rss_end / 2**20, 1),
        "rss_drift": round(drift, 4),
        "floors": floors,
    }
    return result


def print_table(result: dict) -> None:
    t = result["tally"]
    rows = [
        ("requests", t["requests"]), ("complete", t["complete"]), ("cancelled", t["cancelled"]),
        ("429/503 with Retry-After", t["retry_later"]), ("lost", t["lost"]), ("hung", t["hung"]),
        ("5xx", t["server_errors"]), ("other 4xx", t["client_errors"]),
        ("probes / version mixes", f"{t['probes']} / {t['version_mix']}"),
        ("TTFT p50 / p99 (ms)", f"{result['ttft_p50_ms']} / {result['ttft_p99_ms']}"),
        ("statuses seen / counted", f"{result['statuses_seen']} / {result['statuses_counted']}"),
        ("admin actions", result["admin"]),
        ("running batch after", result["running_batch_after"]),
        ("RSS warm -> end (MiB)", f"{result['rss_after_warmup_mib']} -> "
                                  f"{result['rss_after_run_mib']}"),
        ("RSS drift", f"{100 * result['rss_drift']:+.1f}%"),
    ]  # fmt: skip
    for name, value in rows:
        print(f"{name:<28} {value}")
    for name, ok in result["floors"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    for problem in t["problems"]:
        print(f"  problem: {problem}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", default=None, help="checkpoint to serve (default: the built-in)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--warmup-s", type=float, default=30.0)
    p.add_argument("--deadline-s", type=float, default=300.0, help="per request")
    p.add_argument("--admin-every-s", type=float, default=3.0)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--cpu-decode", choices=("fp32", "int4"), default="fp32", help="see above")
    p.add_argument(
        "--server-threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS of the server (0: torch's default); 1 on a machine shared past "
        "its cores, where OpenMP threads wait on each other",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if all(result["floors"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
