"""Decode steps of this checkout against an earlier commit, interleaved in one run.

This machine's memory bandwidth swings by a third within seconds, so a kernel or runtime change
is timed against its base in the same minute: one worker process per (source tree, case), all
built first, then round after round each worker runs a few decode steps in turn (the order
reversed every round). The base tree is `git archive REV` laid out as the installed package
(`owq`, `owq.kernels`, `owq.server`, `owq.quantizer`), put first on the worker's PYTHONPATH.
A case is a running batch (rows) and what its rows are on: `base` (slot 0), `one` (every row on
one adapter), `distinct` (row i on adapter i; adapters are random perturbations of the base's
columns, filled in every layer's slot table) or `shuffled` (the same, rows in a random order of
slots, as a server's rows come). Prints a table of median ms per step and the median of the
per-round speed-ups (base ms / this ms), writes JSON.

examples:
  python benchmarks/ab_decode.py --base HEAD~1                       # rows 1 and 16 on the base
  python benchmarks/ab_decode.py --base 7be03f2 --cases 1:base,16:distinct --rounds 12
  python benchmarks/ab_decode.py --base HEAD --cases 16:base,16:distinct   # one tree, two cases
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "owq": "owq",
    "kernels": "owq/kernels",
    "server": "owq/server",
    "quantizer": "owq/quantizer",
}
SLOTS = 16  # adapter slots of every worker's runtime, as `owq serve` has at --max-batch 16


def export_tree(rev: str, dest: Path) -> Path:
    """`rev`'s sources laid out as the installed package under dest; dest, for PYTHONPATH."""
    archive = dest / "src.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "archive", rev, *PACKAGES], cwd=ROOT, stdout=f, check=True)
    src = dest / "src"
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="data")
    for name, target in PACKAGES.items():
        (src / name).rename(dest / target)  # "owq" first: the others go inside it
    return dest


def worker(ckpt: Path, rows: int, on: str) -> None:
    """Build the runtime, answer "ready", then for each stdin line N run N decode steps and
    print the mean ms per step."""
    import torch
    from cpu_decode import build, step

    from owq.kernels import OWQLinear

    runtime, cache = build(ckpt, True, rows, SLOTS)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in runtime.modules():
            if isinstance(m, OWQLinear) and m.num_weak and m.weak_table.shape[0] > 1:
                base = m.weak_table[:1].float()
                noise = torch.randn(m.weak_table[1:].shape, generator=gen)
                m.weak_table[1:] = (base * (1 + 0.01 * noise)).to(m.weak_table.dtype)
    slots = {
        "base": torch.zeros(rows, dtype=torch.long),
        "one": torch.ones(rows, dtype=torch.long),
        "distinct": torch.arange(rows) % SLOTS + 1,
        "shuffled": torch.randperm(rows, generator=gen) % SLOTS + 1,
    }[on]
    token = torch.full((rows, 1), 5)
    with torch.inference_mode():
        step(runtime, cache, torch.full((rows, 64), 5), 0, slots=slots)
        for i in range(3):
            step(runtime, cache, token, 64 + i, slots=slots)
        print("ready", flush=True)
        position = 67
        for line in sys.stdin:
            n = int(line)
            start = time.perf_counter()
            for _ in range(n):
                step(runtime, cache, token, position, slots=slots)
                position = position + 1 if position < 1000 else 67
            print(1e3 * (time.perf_counter() - start) / n, flush=True)


def spawn(ckpt: Path, rows: int, on: str, tree: Path | None) -> subprocess.Popen:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--worker", str(ckpt), str(rows), on]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"worker {rows}:{on} ({'base' if tree else 'this'} tree) did not start")
    return proc


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", help="git revision to compare against (required)")
    p.add_argument("--ckpt", type=Path, default=None, help="owq checkpoint (default: built-in)")
    cases = "ROWS:ON,... (ON: base|one|distinct|shuffled)"
    p.add_argument("--cases", default="1:base,16:base", help=cases)
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=20, help="decode steps per worker per round")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/ab_decode.json"))
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(Path(args.worker[0]), int(args.worker[1]), args.worker[2])
        return 0
    if args.base is None:
        raise SystemExit("give --base REV, the commit to compare this checkout against")
    if args.ckpt is None:
        from owq.default_checkpoint import default_checkpoint

        args.ckpt = default_checkpoint()
    cases = [(int(r), on) for r, on in (c.split(":") for c in args.cases.split(","))]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True, check=True).stdout.strip()  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="owq-ab-") as tmp:
        tree = export_tree(args.base, Path(tmp))
        workers = [(case, side, spawn(args.ckpt, *case, t)) for case in cases
                   for side, t in (("base", tree), ("this", None))]  # fmt: skip
        times: dict[tuple, list[float]] = {(case, side): [] for case, side, _ in workers}
        for r in range(args.rounds):
            for case, side, proc in workers if r % 2 == 0 else workers[::-1]:
                proc.stdin.write(f"{args.steps}\n")
                proc.stdin.flush()
                times[case, side].append(float(proc.stdout.readline()))
        for *_, proc in workers:
            proc.stdin.close()
            proc.wait()
    print(f"decode step, ms (median of {args.rounds} rounds x {args.steps} steps); "
          f"base {args.base}, this {head} (+ working tree)")  # fmt: skip
    print(
        f"{'rows':>4} {'rows on':8} {'base':>8} {'this':>8} {'speed-up':>9} {'min':>6} {'max':>6}"
    )
    results = []
    for case in cases:
        base, this = times[case, "base"], times[case, "this"]
        ratios = [b / t for b, t in zip(base, this, strict=True)]
        row = {"rows": case[0], "on": case[1], "base_ms": statistics.median(base),
               "this_ms": statistics.median(this), "speedup": statistics.median(ratios),
               "speedup_min": min(ratios), "speedup_max": max(ratios)}  # fmt: skip
        results.append(row)
        print(f"{case[0]:>4} {case[1]:8} {row['base_ms']:8.2f} {row['this_ms']:8.2f} "
              f"{row['speedup']:8.3f}x {min(ratios):6.3f} {max(ratios):6.3f}")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"base": args.base, "this": head, "ckpt": str(args.ckpt), "rounds": args.rounds,
            "steps": args.steps, "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    args.json.write_text(json.dumps({**meta, "results": results, "times": {
        f"{r}:{on}:{side}": v for ((r, on), side), v in times.items()}}, indent=1))  # fmt: skip
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
