"""The CPU decode kernels of the server runtime on the default checkpoint: fp32 dense vs packed.

`kernels/cpu_ops.py` runs fast steps (decode, and prompts not scored) on the layers' codes (the
16-bit GEMM, or torch's 4-bit kernel with bf16 activations: `OWQ_CPU_GEMM`), and steps that
score a prompt on the fp32 dense weight. This measures what that buys and costs, on the
runtime itself (no HTTP): per-step latency at 1, 4 and 16 rows; teacher-forced perplexity on
Persuasion where every token goes through a one-token decode step (so the packed kernel scores
every token); and greedy agreement, the share of generated tokens equal to the fp32 run's.
`--split` instead times where one row's step goes: the low-bit GEMMs alone, the whole layer
ops (weak parts included), the step (what is left is dispatch, norms, RoPE and attention).

examples:
  python benchmarks/cpu_decode.py                      # default checkpoint, ~3 minutes
  python benchmarks/cpu_decode.py --ckpt CKPT --tokens 512 --json out.json
  python benchmarks/cpu_decode.py --split --json benchmarks/results/cpu_decode_split.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

PROMPTS = [
    "It is a truth universally acknowledged, that",
    "The history of the English navy",
    "Dear Sir, I write to you because",
    "She walked into the drawing room and",
    "In the morning the weather was",
    "My dearest sister, you cannot imagine",
    "The principal thing to remember is",
    "Once upon a time there lived",
]


def build(ckpt: Path, packed: bool, rows: int, num_slots: int = 0):
    from owq.kernels.checkpoint import read_checkpoint
    from owq.server.runtime import KVCache, build_runtime

    stored = read_checkpoint(ckpt)
    runtime = build_runtime(stored.config, stored.tensors, 2048, num_slots=num_slots)
    runtime.prepare(packed=packed)
    return runtime, KVCache(runtime.cache_shape(rows))


def step(runtime, cache, tokens: torch.Tensor, start: int, logits="last", slots=None):
    """A prefill from position 0, a decode step (one token per row) after it; `slots`: each
    row's adapter slot (None: the base)."""
    from owq.server.runtime import step_index

    b, t = tokens.shape
    positions = torch.arange(start, start + t).expand(b, t).contiguous()
    decode = start > 0 and t == 1
    return runtime(tokens, step_index(cache.shape, 0, positions, decode), cache, slots, logits)


def latency_ms(runtime, cache, rows: int, steps: int = 48) -> float:
    tokens = torch.full((rows, 1), 5)
    step(runtime, cache, torch.full((rows, 16), 5), 0, "none")
    for i in range(4):
        step(runtime, cache, tokens, 16 + i)
    start = time.perf_counter()
    for i in range(steps):
        step(runtime, cache, tokens, 20 + i)
    return 1e3 * (time.perf_counter() - start) / steps


def split_ms(runtime, cache, rounds: int = 8, steps: int = 24) -> dict:
    """Where a lone row's decode step goes, medians over interleaved rounds: every packed
    projection's 4-bit GEMM alone, back to back on an input of its width (`gemms`); the same
    projections as whole layer ops, their weak parts included (`layers`); the step itself."""
    from owq.kernels import OWQLinear, cpu_ops

    layers = [m for m in runtime.modules() if isinstance(m, OWQLinear) and m.cpu is not None]
    layers = [m for m in layers if m.cpu.kernel is not None]
    inputs = [torch.randn(1, m.in_features) for m in layers]

    def gemms():
        for m, x in zip(layers, inputs, strict=True):
            cpu_ops.dense(x, m.cpu, m.packed, fast=True)

    def layer_ops():
        for m, x in zip(layers, inputs, strict=True):
            m(x, None, True)

    def timed(run) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            run()
        return 1e3 * (time.perf_counter() - start) / steps

    times = {"gemms": [], "layers": [], "step": []}
    for _ in range(rounds):
        times["gemms"].append(timed(gemms))
        times["layers"].append(timed(layer_ops))
        times["step"].append(latency_ms(runtime, cache, 1, steps))
    return {"projections": len(layers)} | {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def decode_perplexity(runtime, cache, ids: list[int]) -> float:
    """Every token through a one-token step: exp(mean NLL of ids[1:])."""
    nll = 0.0
    for t in range(len(ids) - 1):
        logits = step(runtime, cache, torch.tensor([[ids[t]]]), t)[0]
        nll -= float(torch.log_softmax(logits.float(), -1)[ids[t + 1]])
    return math.exp(nll / (len(ids) - 1))


def greedy(runtime, cache, prompt: list[int], new: int) -> list[int]:
    logits = step(runtime, cache, torch.tensor([prompt]), 0)
    out = []
    for i in range(new):
        out.append(int(logits[0].argmax()))
        logits = step(runtime, cache, torch.tensor([[out[-1]]]), len(prompt) + i)
    return out


def measure(ckpt: Path, packed: bool, ids: list[int], prompts: list[list[int]], new: int) -> dict:
    runtime, cache = build(ckpt, packed, 16)
    with torch.inference_mode():
        lat = {rows: latency_ms(runtime, cache, rows) for rows in (1, 4, 16)}
        ppl = decode_perplexity(runtime, cache, ids)
        texts = [greedy(runtime, cache, p, new) for p in prompts]
    return {"latency_ms": lat, "decode_ppl": ppl, "greedy": texts, "kernel": kernel_of(runtime)}


def kernel_of(runtime) -> str:
    """The low-bit kernels the runtime's layers run on fast steps ("fp32": none)."""
    from owq.kernels import OWQLinear

    kinds = {m.cpu.kernel for m in runtime.modules() if isinstance(m, OWQLinear) and m.cpu}
    return "+".join(sorted(k or "fp32" for k in kinds)) or "fp32"


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(share of equal tokens, mean position of the first difference) over the prompts."""
    same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    total = sum(len(r) for r in a)
    first = [first_difference(ra, rb) for ra, rb in zip(a, b, strict=True)]
    return same / total, sum(first) / len(first)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=None, help="owq checkpoint (default: built-in)")
    p.add_argument("--tokens", type=int, default=512, help="Persuasion tokens scored by decode")
    p.add_argument("--new", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/cpu_decode.json"))
    p.add_argument(
        "--split", action="store_true", help="only where a lone row's step goes (~1 minute)"
    )
    return p.parse_args(argv)


def print_split(ckpt: Path, out: Path) -> None:
    runtime, cache = build(ckpt, True, 1)
    with torch.inference_mode():
        split = split_ms(runtime, cache)
    n = split["projections"]
    print(f"one row's decode step, ms (median of interleaved rounds), {n} packed projections")
    print(f"{'low-bit GEMMs alone':32} {split['gemms']:8.2f}")
    print(f"{'+ weak parts (the layer ops)':32} {split['layers']:8.2f}")
    print(f"{'the whole step':32} {split['step']:8.2f}")
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads"
    result = {"checkpoint": str(ckpt), "machine": machine, "date": time.strftime("%Y-%m-%d")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result | {"split_ms": split}, indent=2) + "\n")
    print(f"wrote {out}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from owq.default_checkpoint import default_checkpoint
    from owq.quantizer.texts import eval_text

    ckpt = args.ckpt or default_checkpoint()
    if args.split:
        print_split(ckpt, args.json)
        return 0
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok(eval_text("persuasion")[:20000]).input_ids[: args.tokens]
    prompts = [tok(p).input_ids for p in PROMPTS]
    runs = {k: measure(ckpt, k == "packed", ids, prompts, args.new) for k in ("fp32", "packed")}
    share, first = agreement(runs["fp32"]["greedy"], runs["packed"]["greedy"])
    print(f"{'kernel':8} {'1 row ms':>9} {'4 rows ms':>10} {'16 rows ms':>11} {'decode ppl':>11}")
    for name, r in runs.items():
        lat = r["latency_ms"]
        print(f"{name:8} {lat[1]:9.1f} {lat[4]:10.1f} {lat[16]:11.1f} {r['decode_ppl']:11.3f}")
    speed = runs["fp32"]["latency_ms"][1] / runs["packed"]["latency_ms"][1]
    print(f"packed ({runs['packed']['kernel']}) vs fp32 at 1 row: {speed:.2f}x faster; "
          f"greedy tokens equal: {100 * share:.1f}% "
          f"(first difference at token {first:.1f} of {args.new} on average)")  # fmt: skip
    result = {
        "checkpoint": str(ckpt),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "settings": {"tokens": len(ids), "new": args.new, "prompts": len(prompts)},
        "runs": {n: {k: v for k, v in r.items() if k != "greedy"} for n, r in runs.items()},
        "speedup_1_row": speed,
        "greedy_equal_share": share,
        "greedy_first_difference": first,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
