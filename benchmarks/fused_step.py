"""The compiled CPU step (`kernels/cpu_decode.cpp`) against the runtime's eager blocks, per
model family, on random models of the default model's shapes.

A step's time does not depend on the weights' values, so each family's model is random
(SmolLM2-135M's shapes: 30 blocks, width 576, MLP 1536, 9 query and 3 key/value heads of 64),
every linear rounded to 3-bit codes with `--weak` random weak columns. Only the blocks are
timed (no head: `logits="none"`): decode steps of 1 and 16 rows after a 64-token prompt, the
compiled step and the eager blocks alternated round by round in one process; medians.

examples:
  python benchmarks/fused_step.py                        # llama and qwen3, ~2 minutes
  python benchmarks/fused_step.py --families qwen3 --rounds 12 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

SHAPES = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def random_model(family: str, weak: int, seed: int = 0):
    """A random HF model of the default's shapes, every linear an RTN 3-bit OWQLinear."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    from owq.kernels import OWQLinear
    from owq.kernels.families import family_of, linear_weight, quantized_linear_paths, set_module

    config = {"llama": LlamaConfig, "qwen3": Qwen3Config}[family](**SHAPES, head_dim=64)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    for path in quantized_linear_paths(model, family_of(config)):
        weight = linear_weight(model.get_submodule(path))
        idx = torch.randperm(weight.shape[1], generator=gen)[:weak]
        set_module(model, path, OWQLinear.from_float(weight, 3, -1, idx))
    return model


def steps_ms(runtime, cache, rows: int, steps: int, start: int) -> float:
    """Mean ms of `steps` decode steps of `rows` rows from position `start` (blocks only)."""
    from owq.server.runtime import step_index

    tokens = torch.full((rows, 1), 5)
    begin = time.perf_counter()
    for i in range(steps):
        positions = torch.full((rows, 1), start + i)
        runtime(tokens, step_index(cache.shape, 0, positions, True), cache, None, "none")
    return 1e3 * (time.perf_counter() - begin) / steps


def measure(family: str, weak: int, rounds: int, steps: int) -> dict:
    from owq.server.runtime import KVCache, build_runtime, step_index

    model = random_model(family, weak)
    runtime = build_runtime(model.config, model.state_dict(), 1024)
    runtime.prepare(packed=True)
    stack = runtime.fused
    if stack is None:
        raise SystemExit(f"{family}: the compiled step did not build here")
    out = {}
    with torch.inference_mode():
        for rows in (1, 16):
            cache = KVCache(runtime.cache_shape(rows))
            prompt = torch.arange(64).expand(rows, 64)
            runtime(torch.full((rows, 64), 5), step_index(cache.shape, 0, prompt), cache, None,
                    "none")  # fmt: skip
            times = {"compiled": [], "eager": []}
            for r in range(rounds):
                order = ["compiled", "eager"] if r % 2 == 0 else ["eager", "compiled"]
                for kind in order:
                    runtime.fused = stack if kind == "compiled" else None
                    times[kind].append(steps_ms(runtime, cache, rows, steps, 64))
            runtime.fused = stack
            out[rows] = {k: statistics.median(v) for k, v in times.items()}
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--families", nargs="+", default=["llama", "qwen3"], choices=["llama", "qwen3"])
    p.add_argument("--weak", type=int, default=8, help="weak columns per linear")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=16, help="decode steps per round and kind")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/fused_step.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {f: measure(f, args.weak, args.rounds, args.steps) for f in args.families}
    print(f"blocks of one decode step, ms (median of {args.rounds} interleaved rounds)")
    print(f"{'family':8} {'rows':>4} {'compiled':>9} {'eager':>9} {'speed-up':>9}")
    for family, by_rows in results.items():
        for rows, t in by_rows.items():
            speed = t["eager"] / t["compiled"]
            print(f"{family:8} {rows:4} {t['compiled']:9.2f} {t['eager']:9.2f} {speed:8.2f}x")
    record = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "settings": vars(args) | {"json": str(args.json)},
        "ms": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
