"""The CPU fast kernels on one decode step's GEMMs of the default model's shapes, interleaved.

A step of SmolLM2-135M is 30 blocks of four projections (q/k/v fused 576 -> 960, o 576 -> 576,
gate/up fused 576 -> 3072, down 1536 -> 576; 3-bit, per channel) and the head (576 -> 49152,
4-bit in groups of 32). Each kernel runs in its own worker process on random layers of those
shapes (RTN codes: the kernels' speed does not depend on the codes' values):

- `torch`: torch's 4-bit kernel (`OWQ_CPU_GEMM=bf16`) at the instruction level torch picks;
- `int16`: our 16-bit GEMM in its widest form (AMX from 5 rows where the CPU has it, else
  VNNI where it has that);
- `int16-vnni`: our GEMM held to its VNNI form (`OWQ_CPU_GEMM=vnni`);
- `torch-avx2`: torch's kernel held to AVX2 (`ATEN_CPU_CAPABILITY=avx2`);
- `int16-avx2`: our GEMM's AVX2 form (`OWQ_CPU_GEMM=avx2`).

The two AVX2 rows stand in for an AVX2-only CPU, measured on this one. Round after round each
worker times a step's GEMMs in turn (the order reversed every round: this machine's memory
bandwidth swings within seconds); prints median ms per step, blocks and head apart, and the
speed-up against `torch` of the same level; writes JSON.

examples:
  python benchmarks/cpu_gemm.py                                   # rows 1 and 16, ~2 minutes
  python benchmarks/cpu_gemm.py --rows 1 4 16 --rounds 30 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

KERNELS = {
    "torch": {"OWQ_CPU_GEMM": "bf16"},
    "int16": {},
    "int16-vnni": {"OWQ_CPU_GEMM": "vnni"},
    "torch-avx2": {"OWQ_CPU_GEMM": "bf16", "ATEN_CPU_CAPABILITY": "avx2"},
    "int16-avx2": {"OWQ_CPU_GEMM": "avx2"},
}
BLOCKS = 30
BLOCK_SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out), 3-bit per channel
HEAD = (576, 49152)  # 4-bit, groups of 32


def layers():
    from owq.kernels import OWQLinear

    gen = torch.Generator().manual_seed(0)

    def one(k, n, bits, group):
        layer = OWQLinear.from_float(torch.randn(n, k, generator=gen), bits, group)
        layer.prepare(torch.float32, int4=True, resident=False)
        return layer

    blocks = [one(k, n, 3, -1) for _ in range(BLOCKS) for k, n in BLOCK_SHAPES]
    return blocks, one(*HEAD, 4, 32)


def worker(rows: list[int], steps: int) -> None:
    """Answers each line on stdin (a row count) with `blocks_ms head_ms` of one step's GEMMs."""
    from owq.kernels import cpu_build, cpu_ops

    blocks, head = layers()
    kernel = {layer.cpu.kernel for layer in [*blocks, head]}
    inputs = {m: {k: torch.randn(m, k) for k in {s[0] for s in BLOCK_SHAPES}} for m in rows}
    if kernel == {"int16"}:  # the form: vnni or avx2
        kernel = {["", "avx2", "vnni", "amx"][cpu_build.gemm16().gemm16_level()]}
    print(" ".join(sorted(kernel)), flush=True)

    def timed(run) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            run()
        return 1e3 * (time.perf_counter() - start) / steps

    def run(group, x) -> None:
        for layer in group:
            cpu_ops.dense(x[layer.in_features], layer.cpu, layer.packed, True)

    with torch.inference_mode():
        for line in sys.stdin:
            x = inputs[int(line)]
            a = timed(lambda x=x: run(blocks, x))
            h = timed(lambda x=x: run([head], x))
            print(f"{a:.4f} {h:.4f}", flush=True)


def start(name: str, rows: list[int], steps: int) -> subprocess.Popen:
    env = {**os.environ, **KERNELS[name]}
    for key in ("OWQ_CPU_GEMM", "ATEN_CPU_CAPABILITY"):
        if key not in KERNELS[name]:
            env.pop(key, None)
    cmd = [sys.executable, __file__, "--worker", "--rows", *map(str, rows), "--steps", str(steps)]
    return subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def ask(proc: subprocess.Popen, rows: int) -> tuple[float, float]:
    proc.stdin.write(f"{rows}\n")
    proc.stdin.flush()
    blocks, head = proc.stdout.readline().split()
    return float(blocks), float(head)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16], help="rows of each GEMM")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=5, help="steps a worker times in a round")
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/cpu_gemm.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.rows, args.steps)
        return 0
    procs = {name: start(name, args.rows, args.steps) for name in args.kernels}
    ran = {name: proc.stdout.readline().strip() for name, proc in procs.items()}  # built
    for name, m in [(n, m) for n in procs for m in args.rows]:  # a round to warm up, not kept
        ask(procs[name], m)
    times = {(n, m): {"blocks": [], "head": []} for n in procs for m in args.rows}
    order = [(n, m) for m in args.rows for n in procs]
    for r in range(args.rounds):
        for name, m in order if r % 2 == 0 else order[::-1]:
            blocks, head = ask(procs[name], m)
            times[name, m]["blocks"].append(blocks)
            times[name, m]["head"].append(head)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    med = {key: {part: statistics.median(v) for part, v in t.items()} for key, t in times.items()}
    print(f"{'kernel':12} {'ran':12} {'rows':>4} {'blocks ms':>10} {'head ms':>8} {'step ms':>8} "
          f"{'vs torch':>9}")  # fmt: skip
    rows_out = []
    for name, m in order:
        t = med[name, m]
        step = t["blocks"] + t["head"]
        ref = "torch-avx2" if name.endswith("avx2") else "torch"  # the same level
        speed = ""
        if ref in procs:
            speed = (med[ref, m]["blocks"] + med[ref, m]["head"]) / step
        shown = f"{speed:8.2f}x" if speed else ""
        print(f"{name:12} {ran[name]:12} {m:4d} {t['blocks']:10.2f} {t['head']:8.2f} "
              f"{step:8.2f} {shown:>9}")  # fmt: skip
        rows_out.append({"kernel": name, "ran": ran[name], "rows": m, **t, "step": step,
                         "speedup_vs_torch": speed or None})  # fmt: skip
    result = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "settings": {"rounds": args.rounds, "steps": args.steps, "blocks": BLOCKS},
        "rows": rows_out,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
