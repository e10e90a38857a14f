"""GPTQ baseline parity: our GPTQ-3 (and OWQ-3.05) against the reference protocol, over seeds.

Quantizes the built-in default model (SmolLM2-135M) once per (configuration, protocol, sampler,
seed) and scores each checkpoint on Persuasion, so the spread that comes from the calibration
sampler's draw alone is measured, and each switch of the reference GPTQ/OWQ scripts' protocol is
measured against it:

- sampler `torch` (ours: one `torch.randint` draw) or `python` (the reference scripts:
  `random.seed(seed)`, then `random.randint(0, N - seqlen - 1)` per window; `--sampler python`);
- protocol `ours` (calibration forward in fp32, grid scale rounded to fp16 before the zero point),
  `fp16-fwd` (the model run in fp16 during calibration, as the reference's `model.half()`: H from
  fp16 activations, quantized weights in fp16 for the next block's inputs), `fp32-scale` (the grid
  keeps its fp32 scale during GPTQ, as the reference's min-max quantizer; the checkpoint stores it
  in fp16), `batch-1` (one calibration window per forward, as the reference runs them: the same
  sums in another floating-point order), `ref` (all three);
- evaluation in float32 (ours) or float16 (the reference's fp16 logits).

Checkpoints and perplexities are cached in the work dir, so an interrupted run resumes. Prints a
table (one line per configuration × protocol × sampler × eval dtype, one column per seed) and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("benchmarks.gptq_parity")

CONFIGS: dict[str, dict] = {
    "gptq-3": {"method": "gptq", "wbits": 3},
    "owq-3.05": {"method": "owq", "wbits": 3, "target_bits": 3.05},
}


@dataclass(frozen=True)
class Protocol:
    fp16_forward: bool = False  # the model in fp16 during calibration (reference: model.half())
    fp32_scale: bool = False  # GPTQ on the fp32 min-max scale (reference), not the fp16-rounded
    batch_size: int = 8  # calibration windows per forward; the reference runs one at a time


PROTOCOLS = {
    "ours": Protocol(),
    "fp16-fwd": Protocol(fp16_forward=True),
    "fp32-scale": Protocol(fp32_scale=True),
    "batch-1": Protocol(batch_size=1),  # same maths, the float sums in another order
    "ref": Protocol(fp16_forward=True, fp32_scale=True, batch_size=1),
}
SAMPLERS = ("torch", "python")
EVAL_DTYPES = ("float32", "float16")

EXAMPLES = """examples:
  # what matters, at reduced calibration (32 x 512), GPTQ-3 only, five seeds
  python benchmarks/gptq_parity.py --configs gptq-3 --protocols ours fp16-fwd \\
      --nsamples 32 --seeds 0 1 2 3 4
  # the full reference protocol (128 x 512), both samplers, OWQ-3.05 as the cross-check
  python benchmarks/gptq_parity.py --configs gptq-3 owq-3.05 --samplers torch python
  python benchmarks/gptq_parity.py --eval-dtypes float32 float16 --seeds 0 --max-windows 0
"""


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", nargs="+", default=["gptq-3"], choices=list(CONFIGS))
    p.add_argument("--protocols", nargs="+", default=["ours"], choices=list(PROTOCOLS))
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--eval-dtypes", nargs="+", default=["float32"], choices=EVAL_DTYPES)
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument(
        "--max-windows", type=int, default=64, help="Persuasion windows to score (0: all 225)"
    )
    p.add_argument("--work-dir", type=Path, default=Path("benchmarks/work/parity"))
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/gptq_parity.json"))
    return p.parse_args(argv)


@dataclass(frozen=True)
class Run:
    config: str
    protocol: str
    sampler: str
    seed: int

    def directory(self, args) -> Path:
        name = f"{self.config}-{self.protocol}-{self.sampler}-n{args.nsamples}-s{args.seqlen}"
        return args.work_dir / f"{name}-seed{self.seed}"


@contextmanager
def fp32_scales():
    """The min-max/search grid keeps its fp32 scale while this is active (reference quantizer)."""
    from unittest import mock

    from owq.quantizer import search

    with mock.patch.object(search, "_grid_for", partial(search._grid_for, fp16_scale=False)):
        yield


def half_model():
    """The default model in fp16, every decoder block fed fp16 hidden states (the driver keeps
    its block inputs in fp32 between blocks; the reference keeps them in the model's dtype)."""
    import torch

    from owq.builtin.model import load_float_model
    from owq.kernels.families import blocks_of, family_of

    lm, tokenizer = load_float_model("default")
    torch.nn.Module.half(lm)  # transformers refuses .half() on a model loaded from a GGUF

    def to_half(_module, args):
        return (args[0].to(torch.float16), *args[1:])

    for block in blocks_of(lm, family_of(lm.config)):
        block.register_forward_pre_hook(to_half)
    return lm, tokenizer


def quantize_run(run: Run, args) -> Path:
    """Quantize (or reuse) the checkpoint of one run."""
    from owq.kernels.checkpoint import is_checkpoint
    from owq.quantizer.api import quantize
    from owq.quantizer.settings import QuantizeSettings

    out = run.directory(args)
    if is_checkpoint(out):
        return out
    settings = QuantizeSettings(
        **CONFIGS[run.config],
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=run.seed,
        sampler=run.sampler,
        batch_size=PROTOCOLS[run.protocol].batch_size,
    )
    protocol = PROTOCOLS[run.protocol]
    with ExitStack() as stack:
        if protocol.fp32_scale:
            stack.enter_context(fp32_scales())
        model, tokenizer = half_model() if protocol.fp16_forward else ("default", None)
        start = time.perf_counter()
        quantize(model, out, settings, overwrite=True, progress=False, tokenizer=tokenizer)
    log.info("%s quantized in %.0fs", out.name, time.perf_counter() - start)
    return out


def evaluate(checkpoint: Path, dtype: str, args, text: str) -> dict:
    """Perplexity of one checkpoint on Persuasion in `dtype`, cached next to it."""
    import torch

    from owq.quantizer.models import load_model
    from owq.quantizer.perplexity import perplexity

    windows = args.max_windows or None
    cache = checkpoint / f"eval-{dtype}-s{args.eval_seqlen}-w{windows or 'all'}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    start = time.perf_counter()
    model, tokenizer, _ = load_model(str(checkpoint), getattr(torch, dtype))
    ids = torch.tensor(tokenizer(text).input_ids)
    result = perplexity(model, ids, args.eval_seqlen, windows, progress=False)
    row = {"ppl": result.ppl, "tokens": result.tokens, "windows": result.windows}
    row["eval_seconds"] = time.perf_counter() - start
    cache.write_text(json.dumps(row, indent=2) + "\n")
    return row


def codes_differing(a: Path, b: Path) -> float | None:
    """Fraction of the quantized codes of every linear that differ between two checkpoints."""
    from safetensors.torch import load_file

    from owq.kernels.checkpoint import WEIGHTS_NAME
    from owq.kernels.packing import unpack_codes

    if not (b / WEIGHTS_NAME).is_file():
        return None
    bits = json.loads((a / "owq_report.json").read_text())["settings"]["wbits"]
    ta, tb = load_file(a / WEIGHTS_NAME), load_file(b / WEIGHTS_NAME)
    differ = total = 0
    for key in (k for k in ta if k.endswith(".qweight")):
        ca, cb = unpack_codes(ta[key], bits), unpack_codes(tb[key], bits)
        differ += int((ca != cb).sum())
        total += ca.numel()
    return differ / total


def code_changes(run: Run, checkpoint: Path, args) -> dict:
    """How far this checkpoint's codes moved from `ours` of the same draw, and from seed 0."""
    ours = Run(run.config, "ours", run.sampler, run.seed).directory(args)
    seed0 = Run(run.config, run.protocol, run.sampler, 0).directory(args)
    return {
        "codes_vs_ours": None if run.protocol == "ours" else codes_differing(checkpoint, ours),
        "codes_vs_seed0": None if run.seed == 0 else codes_differing(checkpoint, seed0),
    }


def measure(run: Run, args, text: str) -> list[dict]:
    checkpoint = quantize_run(run, args)
    report = json.loads((checkpoint / "owq_report.json").read_text())
    changes = code_changes(run, checkpoint, args)
    rows = []
    for dtype in args.eval_dtypes:
        row = {**vars(run), "eval_dtype": dtype, "checkpoint": str(checkpoint)}
        row |= evaluate(checkpoint, dtype, args, text)
        row |= changes
        row["quantize_seconds"] = report["seconds"]["total"]
        rows.append(row)
        log.info("%s %s: ppl %.3f", checkpoint.name, dtype, row["ppl"])
    return rows


def _mean_of(rows: list[dict], field: str) -> float | None:
    values = [r[field] for r in rows if r.get(field) is not None]
    return statistics.fmean(values) if values else None


def summarize(rows: list[dict]) -> list[dict]:
    """One line per configuration × protocol × sampler × eval dtype, over its seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["config"], r["protocol"], r["sampler"], r["eval_dtype"])
        groups.setdefault(key, []).append(r)
    out = []
    for (config, protocol, sampler, dtype), members in groups.items():
        ppls = [r["ppl"] for r in members]
        out.append(
            {
                "config": config,
                "protocol": protocol,
                "sampler": sampler,
                "eval_dtype": dtype,
                "ppl_by_seed": {r["seed"]: r["ppl"] for r in members},
                "mean": statistics.fmean(ppls),
                "std": statistics.stdev(ppls) if len(ppls) > 1 else 0.0,
                "min": min(ppls),
                "max": max(ppls),
                "codes_vs_ours": _mean_of(members, "codes_vs_ours"),
                "codes_vs_seed0": _mean_of(members, "codes_vs_seed0"),
            }
        )
    return out


def _percent(value: float | None) -> str:
    return f"{'-':>9}" if value is None else f"{value:>9.1%}"


def format_table(summary: list[dict], seeds: list[int]) -> str:
    """ppl per seed and over seeds; Δcodes: share of codes that differ from `ours` of the same
    draw (a protocol's own effect) and from seed 0 (the draw's effect), averaged."""
    seed_cols = "".join(f"{'seed ' + str(s):>9}" for s in seeds)
    head = (
        f"{'config':<9} {'protocol':<10} {'sampler':<7} {'eval':<7}{seed_cols}"
        f"{'mean':>9}{'std':>8}{'min':>9}{'max':>9}{'max/min':>8}{'Δc ours':>9}{'Δc seed0':>9}"
    )
    lines = [head, "-" * len(head)]
    for s in summary:
        by_seed = s["ppl_by_seed"]
        cells = "".join(
            f"{by_seed[seed]:>9.2f}" if seed in by_seed else f"{'-':>9}" for seed in seeds
        )
        lines.append(
            f"{s['config']:<9} {s['protocol']:<10} {s['sampler']:<7} {s['eval_dtype']:<7}{cells}"
            f"{s['mean']:>9.2f}{s['std']:>8.2f}{s['min']:>9.2f}{s['max']:>9.2f}"
            f"{s['max'] / s['min']:>8.2f}{_percent(s['codes_vs_ours'])}"
            f"{_percent(s['codes_vs_seed0'])}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from owq.quantizer.texts import eval_text

    text = eval_text("persuasion")
    runs = [
        Run(config, protocol, sampler, seed)
        for config in args.configs
        for protocol in args.protocols
        for sampler in args.samplers
        for seed in args.seeds
    ]
    load_before = os.getloadavg()
    rows = []
    for run in tqdm(runs, desc="parity runs", unit="run"):
        rows.extend(measure(run, args, text))
    summary = summarize(rows)
    print(format_table(summary, args.seeds))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    machine = {"load_average_at_start": load_before, "load_average_at_end": os.getloadavg()}
    payload = {"settings": settings, "machine": machine, "summary": summary, "rows": rows}
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
