"""Quality benchmark: the shape of the OWQ paper's Table 1 on the built-in default model.

Quantizes the default model (SmolLM2-135M) with each configuration (RTN, GPTQ and its variants,
OWQ at several bit budgets, uniform vs global allocation), measures perplexity on Persuasion and
reports nominal and true bits and quantization time. Checkpoints and evaluations are kept in a
work dir and reused, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("benchmarks.quality")

CONFIGS: dict[str, dict | None] = {
    "fp": None,
    "rtn-3": {"method": "rtn", "wbits": 3},
    "rtn-4": {"method": "rtn", "wbits": 4},
    "gptq-3": {"method": "gptq", "wbits": 3},
    "gptq-4": {"method": "gptq", "wbits": 4},
    "gptq-3-ao-ts": {"method": "gptq", "wbits": 3, "act_order": True, "true_sequential": True},
    "gptq-3-g64": {"method": "gptq", "wbits": 3, "groupsize": 64},  # 576 = 4.5 x 128
    "gptq-3-search": {"method": "gptq", "wbits": 3, "search": True},
    "gptq-4-search": {"method": "gptq", "wbits": 4, "search": True},
    "owq-3.05-minmax": {"method": "owq", "wbits": 3, "target_bits": 3.05, "search": False},
    "owq-3.01": {"method": "owq", "wbits": 3, "target_bits": 3.01},
    "owq-3.05": {"method": "owq", "wbits": 3, "target_bits": 3.05},
    "owq-3.1": {"method": "owq", "wbits": 3, "target_bits": 3.1},
    "owq-4.05": {"method": "owq", "wbits": 4, "target_bits": 4.05},
    "owq-3.05-global": {"method": "owq", "wbits": 3, "target_bits": 3.05, "allocation": "global"},
}

EXAMPLES = """examples:
  python benchmarks/quality.py                                  # the full table (hours on 2 cores)
  python benchmarks/quality.py --configs fp gptq-3 owq-3.05 --nsamples 16 --seqlen 256 \\
      --max-windows 16                                          # a quick reduced check
  python benchmarks/quality.py --list                           # the configurations
"""


def add_protocol_args(p: argparse.ArgumentParser, json_path: Path) -> None:
    """The calibration and evaluation protocol, work dir and JSON output (shared by the
    benchmarks that build on these checkpoints)."""
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=64, help="Persuasion windows to score")
    p.add_argument("--work-dir", type=Path, default=Path("benchmarks/work"))
    p.add_argument("--json", type=Path, default=json_path)


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    add_protocol_args(p, Path("benchmarks/results/quality.json"))
    p.add_argument("--list", action="store_true", help="print the configurations and exit")
    return p.parse_args(argv)


def checkpoint_for(name: str, fields: dict, args) -> Path:
    """Quantize (or reuse) the checkpoint of one configuration."""
    from owq.kernels.checkpoint import is_checkpoint
    from owq.quantizer.api import quantize
    from owq.quantizer.settings import QuantizeSettings

    out = args.work_dir / f"{name}-n{args.nsamples}-s{args.seqlen}-seed{args.seed}"
    if is_checkpoint(out):
        log.info("reusing %s", out)
        return out
    settings = QuantizeSettings(
        **fields, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed
    )
    return quantize("default", out, settings, overwrite=True)


def evaluate(name: str, model_arg: str, args, text: str) -> dict:
    """Perplexity row, cached next to the checkpoint (or in the work dir for fp)."""
    from owq.quantizer.eval_cli import evaluate_one

    base = Path(model_arg) if name != "fp" else args.work_dir / "fp"
    cache = base / f"eval-s{args.eval_seqlen}-w{args.max_windows}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    row = evaluate_one(model_arg, text, args.eval_seqlen, args.max_windows)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(row, indent=2) + "\n")
    return row


def run_config(name: str, args, text: str) -> dict:
    fields = CONFIGS[name]
    row = {"config": name, "settings": fields}
    if fields is None:
        row |= evaluate(name, "default", args, text)
        row |= {"nominal_bits": 16.0, "paper_bits": 16.0, "quantize_seconds": 0.0}
        return row
    start = time.perf_counter()
    ckpt = checkpoint_for(name, fields, args)
    log.info("%s ready after %.0fs", name, time.perf_counter() - start)
    report = json.loads((ckpt / "owq_report.json").read_text())
    row |= evaluate(name, str(ckpt), args, text)
    row |= {
        "nominal_bits": report["bits"]["nominal_bits_linear"],
        "paper_bits": report["paper_bits"],
        "quantize_seconds": report["seconds"]["total"],
    }
    return row


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'config':<18} {'ppl':>9} {'paper b':>8} {'nominal':>8} {'true lin':>9} "
        f"{'true all':>9} {'quant s':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['config']:<18} {r['ppl']:>9.3f} {r['paper_bits']:>8.3f} {r['nominal_bits']:>8.3f} "
            f"{r['bits_per_weight_linear']:>9.3f} {r['bits_per_weight_total']:>9.3f} "
            f"{r['quantize_seconds']:>8.0f}"
        )
    return "\n".join(lines)


def floors(rows: list[dict]) -> list[str]:
    """The acceptance floors that the present rows allow checking."""
    ppl = {r["config"]: r["ppl"] for r in rows}
    secs = {r["config"]: r["quantize_seconds"] for r in rows}
    checks = []
    if {"fp", "gptq-3", "owq-3.05"} <= ppl.keys():
        closed = (ppl["gptq-3"] - ppl["owq-3.05"]) / (ppl["gptq-3"] - ppl["fp"])
        checks.append(f"owq-3.05 closes {closed:.0%} of the gptq-3 -> fp gap (floor 75%)")
    if {"owq-3.1", "gptq-4"} <= ppl.keys():
        rel = ppl["owq-3.1"] / ppl["gptq-4"] - 1
        checks.append(f"owq-3.1 vs gptq-4 ppl: {rel:+.1%} (floor: within +5%)")
    if {"owq-4.05", "gptq-4"} <= ppl.keys():
        checks.append(f"owq-4.05 < gptq-4: {ppl['owq-4.05'] < ppl['gptq-4']}")
    if {"owq-3.05", "owq-3.05-global"} <= ppl.keys():
        checks.append(
            f"global {ppl['owq-3.05-global']:.3f} vs uniform {ppl['owq-3.05']:.3f} (floor: <=)"
        )
    if "owq-3.05" in secs:
        checks.append(f"owq-3.05 quantized in {secs['owq-3.05'] / 60:.1f} min (floor 11)")
    return checks


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, fields in CONFIGS.items():
            print(f"{name:<18} {fields}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from owq.quantizer.texts import eval_text

    text = eval_text("persuasion")
    rows = [run_config(name, args, text) for name in args.configs]
    print(format_table(rows))
    checks = floors(rows)
    for line in checks:
        print(line)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "work_dir", "list")}
    payload = {"settings": settings, "results": rows, "floors": checks}
    args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
