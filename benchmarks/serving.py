"""Serving benchmark: `owq serve` against llama-cpp-python's OpenAI server on the same GGUF file
and transformers `generate`, in one run, interleaved.

Both servers run side by side as processes for the whole run (`python -m owq serve`, and
`python -m llama_cpp.server` from the interpreter `--llama-python` names, e.g. a venv outside the
repo, since llama-cpp-python compiles for ~25 minutes). Every comparison alternates its sides
round by round and compares medians, because this machine's memory bandwidth swings by a third
within seconds: batch-1 greedy streams (owq, llama.cpp, transformers on the float model),
16 concurrent clients (owq, llama.cpp), 16 clients on the base against 16 clients over 16
distinct adapters, and one adapter. Every request of a load decodes all its tokens (EOS is
ignored: owq's `ignore_eos`, llama.cpp's `min_tokens`), so that its sides do equal work; batch-1
streams are greedy and may end at EOS. Reports owq's peak RSS. Prints a table, checks the floors,
writes JSON. Run it alone: it uses every core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from serving_clients import (
    PROMPTS,
    START_TIMEOUT_S,
    Scenario,
    body,
    full_length,
    histogram_totals,
    make_adapters,
    owq_serve,
    print_table,
    run_clients,
    start_server,
    stop,
)

EXAMPLES = """examples:
  OWQ_LLAMA_PYTHON=/path/to/llama-venv/bin/python python benchmarks/serving.py
  python benchmarks/serving.py --quick --no-llama-cpp          # a smoke run
  python benchmarks/serving.py --ckpt ckpt/owq-3 --max-tokens 128 --rounds 7
"""
SETTLE_S = 1.0  # between two sides of a round: the last one's OpenMP threads stop spinning


# ---- servers ---------------------------------------------------------------------------------
def start_owq(ckpt: Path, adapters: Path, max_batch: int, log):
    return start_server(owq_serve(ckpt, adapters, max_batch), "/ready", START_TIMEOUT_S, log)


def llama_python(args) -> tuple[str, str | None]:
    """(interpreter, reason it cannot run llama.cpp's server or None)."""
    python = args.llama_python or os.environ.get("OWQ_LLAMA_PYTHON") or sys.executable
    probe = [python, "-c", "import llama_cpp.server, sse_starlette"]
    if subprocess.run(probe, capture_output=True).returncode != 0:
        hint = "pip install 'llama-cpp-python[server]' in a venv, pass --llama-python"
        return python, f"{python} cannot import llama_cpp.server ({hint} or OWQ_LLAMA_PYTHON)"
    return python, None


def start_llama_cpp(python: str, log):
    from owq.builtin.model import default_gguf_path

    threads = os.cpu_count() or 1  # --interrupt_requests False: queue, do not cut the running one
    flags = f"--host 127.0.0.1 --n_ctx 2048 --n_threads {threads} --interrupt_requests False"
    cmd = ["llama_cpp.server", "--model", str(default_gguf_path()), *flags.split()]
    return start_server(cmd, "/v1/models", 300, log, python=python)


def peak_rss_mib(pid: int) -> float:
    """VmHWM of a process (Linux), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- transformers reference ------------------------------------------------------------------
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

    def scenario(self, max_tokens: int) -> Scenario:
        first, full = self.timed(1), self.timed(max_tokens)
        sc = Scenario("round", "transformers", 1, 0, 1, max_tokens)
        sc.ttft_p50_ms = first * 1e3
        sc.decode_tokens_per_s = (max_tokens - 1) / max(full - first, 1e-9)
        sc.tokens_per_s = max_tokens / full
        return sc


# ---- interleaved rounds ----------------------------------------------------------------------
def median_of(name: str, server: str, clients: int, adapters: int, rounds: list[Scenario]):
    """One Scenario holding the medians of its rounds."""
    out = Scenario(name, server, clients, adapters)
    out.requests = sum(r.requests for r in rounds)
    out.tokens = sum(r.tokens for r in rounds)
    out.errors = sorted({e for r in rounds for e in r.errors})
    for key in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
                "decode_tokens_per_s"):  # fmt: skip
        setattr(out, key, statistics.median(getattr(r, key) for r in rounds))
    return out


def interleave(sides: dict, rounds: int) -> dict[str, list[Scenario]]:
    """Run every side once per round, in turn, with a pause between sides. The order rotates
    by one side a round, so that no side always runs right after the same other one (after
    llama.cpp's run, or first in a round)."""
    out: dict[str, list[Scenario]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            time.sleep(SETTLE_S)
            out[name].append(sides[name]())
    return out


def round_ratios(a: list[Scenario], b: list[Scenario], key: str = "tokens_per_s") -> list[float]:
    """a's `key` over b's in each round (sides run in the same minute of a round): the spread
    that a ratio of medians hides. Rounds where either side failed are left out."""
    return [getattr(x, key) / getattr(y, key) for x, y in zip(a, b, strict=True)
            if not x.errors and not y.errors and getattr(y, key)]  # fmt: skip


def client_run(url: str, clients: int, models: list, args, temperature=0.8, extra=None):
    def run() -> Scenario:
        bodies = [body(i, args.max_tokens, m, temperature, extra) for i, m in enumerate(models)]
        sc = Scenario("round", "", clients, 0)
        return asyncio.run(run_clients(url, sc, bodies, args.per_client))

    return run


def step_totals(url: str) -> dict[str, tuple[float, float]]:
    """{adapters label: (seconds, steps)} of the server's decode steps so far (`owq_step_seconds`:
    0, 1 or 2+ distinct adapters in the batch)."""
    return histogram_totals(url, "owq_step_seconds", by="adapters", phase="decode")


def step_means_ms(before: dict, after: dict) -> dict[str, float]:
    """Mean decode step (ms) between two `step_totals`, by the label's meaning in the loads."""
    names = {"0": "base", "1": "one adapter", "2+": "distinct adapters"}
    out = {}
    for label, (seconds, steps) in after.items():
        s0, n0 = before.get(label, (0.0, 0.0))
        if steps > n0:
            out[names.get(label, label)] = 1e3 * (seconds - s0) / (steps - n0)
    return out


def scenarios(args, owq_url: str, llama_url: str | None, names: list[str]):
    """(rows, {"owq_decode_step_ms": owq's mean decode step during the loads by what its batch
    was on, "round_ratios": each adapter load's tokens/s over the base's, round by round})."""
    many = args.clients
    batch1 = {"owq": client_run(owq_url, 1, [None], args, temperature=0.0)}
    if llama_url:
        batch1["llama.cpp"] = client_run(llama_url, 1, [None], args, temperature=0.0)
    if not args.no_transformers:
        reference = TransformersReference()
        batch1["transformers"] = lambda: reference.scenario(args.max_tokens)
    out = []
    for side, rounds in interleave(batch1, args.rounds).items():
        out.append(median_of(f"{side}, batch 1 greedy", side, 1, 0, rounds))
    full = full_length("owq", args.max_tokens)
    load = {"owq": client_run(owq_url, many, [None] * many, args, extra=full)}
    load["owq-adapters"] = client_run(owq_url, many, names[:many], args, extra=full)
    load["owq-one-adapter"] = client_run(owq_url, many, [names[0]] * many, args, extra=full)
    if llama_url:
        llama_full = full_length("llama.cpp", args.max_tokens)
        load["llama.cpp"] = client_run(llama_url, many, [None] * many, args, extra=llama_full)
    labels = {
        "owq": f"owq base, {many} clients",
        "owq-adapters": f"owq {many} adapters",
        "owq-one-adapter": "owq one adapter",
        "llama.cpp": f"llama.cpp, {many} clients",
    }
    adapters = {"owq-adapters": many, "owq-one-adapter": 1}
    before = step_totals(owq_url)
    loads = interleave(load, args.load_rounds)
    step_ms = step_means_ms(before, step_totals(owq_url))
    for side, rounds in loads.items():
        server = "owq" if side.startswith("owq") else side
        out.append(median_of(labels[side], server, many, adapters.get(side, 0), rounds))
    ratios = {labels[side]: round_ratios(loads[side], loads["owq"]) for side in adapters}
    return out, {"owq_decode_step_ms": step_ms, "round_ratios": ratios}


# ---- floors ----------------------------------------------------------------------------------
def find(rows: list[Scenario], server: str, clients: int, adapters: int = 0):
    key = (server, clients, adapters)
    return next((s for s in rows if (s.server, s.clients, s.adapters) == key), None)


def ratio_floor(name: str, a: Scenario | None, b: Scenario | None, key: str, threshold: float):
    """a's `key` over b's; a side whose requests failed (or made no tokens) fails the floor
    with no value, rather than dividing by nothing."""
    if a is None or b is None:
        return None
    broken = [s for s in (a, b) if s.errors or not getattr(s, key)]
    if broken:
        why = "; ".join(f"{s.server}: {', '.join(s.errors) or 'no tokens'}" for s in broken)
        return {"floor": name, "value": math.nan, "threshold": threshold, "passed": False,
                "note": f"not measured ({why})"}  # fmt: skip
    value = getattr(a, key) / getattr(b, key)
    return {"floor": name, "value": value, "threshold": threshold, "passed": value >= threshold}


def floors(rows: list[Scenario], many: int) -> list[dict]:
    owq1, llama1 = find(rows, "owq", 1), find(rows, "llama.cpp", 1)
    hf, owq_many = find(rows, "transformers", 1), find(rows, "owq", many)
    checks = [
        ratio_floor("batch-1 decode >= llama.cpp server", owq1, llama1, "decode_tokens_per_s", 1.0),
        ratio_floor(
            "batch-1 decode >= transformers generate", owq1, hf, "decode_tokens_per_s", 1.0
        ),
        ratio_floor(
            f"{many} clients >= 3x llama.cpp's tokens/s",
            owq_many,
            find(rows, "llama.cpp", many),
            "tokens_per_s",
            3.0,
        ),  # fmt: skip
        ratio_floor(
            f"{many} distinct adapters >= 0.95x the base",
            find(rows, "owq", many, many),
            owq_many,
            "tokens_per_s",
            0.95,
        ),  # fmt: skip
        ratio_floor(
            f"{many} clients on one adapter >= 0.95x the base",
            find(rows, "owq", many, 1),
            owq_many,
            "tokens_per_s",
            0.95,
        ),  # fmt: skip
    ]
    return [c for c in checks if c is not None]


# ---- the run ---------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--ckpt", type=Path, default=None, help="owq checkpoint (default: built-in)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 clients, 8 tokens")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per request (128)")
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (16)")
    p.add_argument("--per-client", type=int, default=None, help="requests per client (1)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved batch-1 rounds (7)")
    p.add_argument("--load-rounds", type=int, default=None, help="rounds of the loads (8)")
    p.add_argument("--llama-python", default=None, help="python with llama-cpp-python[server]")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers ref")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp reference")
    p.add_argument("--json", type=Path, help="default benchmarks/results/serving(-quick).json")
    args = p.parse_args(argv)
    quick = args.quick
    args.max_tokens = args.max_tokens or (8 if quick else 128)
    args.clients = args.clients or (4 if quick else 16)
    args.per_client = args.per_client or 1
    args.rounds = args.rounds or (2 if quick else 7)
    args.load_rounds = args.load_rounds or (1 if quick else 8)
    results = Path(__file__).resolve().parent / "results"
    args.json = args.json or results / ("serving-quick.json" if quick else "serving.json")
    return args


def run(args, log, notes: list[str]) -> tuple[list[Scenario], float, dict]:
    """(rows, owq's peak RSS in MiB, what `scenarios` measured inside the loads)."""
    llama = None
    if args.no_llama_cpp:
        notes.append("llama.cpp reference skipped (--no-llama-cpp)")
    else:
        python, missing = llama_python(args)
        if missing:
            notes.append(f"llama.cpp reference unavailable: {missing}")
        else:
            llama = start_llama_cpp(python, log)
    with tempfile.TemporaryDirectory(prefix="owq-bench-adapters-") as tmp:
        names = make_adapters(args.ckpt, Path(tmp), args.clients)
        proc, url = start_owq(args.ckpt, Path(tmp), max(16, args.clients), log)
        try:
            for target in (url, llama[1] if llama else None):
                if target:
                    warm = Scenario("warm-up", "", 1, 0)
                    asyncio.run(run_clients(target, warm, [body(0, 4)], 1))
            rows, measured = scenarios(args, url, llama[1] if llama else None, names)
            return rows, peak_rss_mib(proc.pid), measured
        finally:
            stop(proc)
            if llama:
                stop(llama[0])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ckpt is None:
        from owq.default_checkpoint import default_checkpoint

        args.ckpt = default_checkpoint()
    notes: list[str] = []
    log_path = Path(tempfile.gettempdir()) / f"owq-{args.json.stem}-servers.log"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    with open(log_path, "w") as log:
        rows, rss, measured = run(args, log, notes)
    notes.append(f"owq serve peak RSS {rss:.0f} MiB")
    if step_ms := measured["owq_decode_step_ms"]:
        shown = ", ".join(f"{name} {ms:.1f}" for name, ms in step_ms.items())
        notes.append(f"owq decode step inside the server during the loads, mean ms: {shown}")
    for name, ratios in measured["round_ratios"].items():
        if ratios:
            spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
            median = statistics.median(ratios)
            notes.append(f"{name} / base tokens/s, round by round: median {median:.2f}, {spread}")
    notes.append(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    checks = floors(rows, args.clients)
    print_table(rows, notes)
    for r in checks:
        verdict = "PASS" if r["passed"] else "FAIL"
        note = f" {r['note']}" if "note" in r else ""
        print(f"floor: {r['floor']}: {r['value']:.2f} (>= {r['threshold']}) {verdict}{note}")
    keys = ("quick", "max_tokens", "clients", "per_client", "rounds", "load_rounds")
    report = {
        "ckpt": str(args.ckpt), **{k: getattr(args, k) for k in keys},
        "cpu_count": os.cpu_count(), "owq_peak_rss_mib": rss,
        **measured,
        "scenarios": [asdict(s) for s in rows], "floors": checks, "notes": notes,
        "server_log": str(log_path),
    }  # fmt: skip
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
