"""Whole-model low bits: Persuasion perplexity against the whole file's true bits per weight.

The blocks are quantized once per base configuration (OWQ-3.05, GPTQ-3/4, through
`quality.checkpoint_for`, so the quality benchmark's checkpoints are shared); every head variant
then quantizes only the vocabulary table of the OWQ-3.05 base from one calibration pass (the
Hessian of the head's input and the token counts: the same statistics `owq quantize --head-bits`
computes after its last block) and is saved as a checkpoint of its own. Rows: the fp16 head, an
8-bit head, 4-bit heads with 0 / 0.1 / 1 / 5% protected rows (by error, and by frequency), a
3-bit head, head weak columns, the whole-budget allocations, GPTQ-3/4 and the Q4_1 GGUF itself.
Prints a table, writes JSON, and a PNG plot when matplotlib is installed (`pip install
matplotlib`). Work is cached in the work dir: an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import quality

log = logging.getLogger("benchmarks.whole_model")

BASE = "owq-3.05"
G32 = {"head_bits": 4, "head_groupsize": 32}
FREQ = {"head_protect_by": "frequency"}
HEADS: dict[str, dict] = {  # vocabulary-table settings on the OWQ-3.05 blocks
    "h8": {"head_bits": 8},
    "h4": {"head_bits": 4},
    "h4-g64": {"head_bits": 4, "head_groupsize": 64},
    "h4-g32": G32,
    "h4-g32-p0.1f": {**G32, **FREQ, "head_protect": 0.001},
    "h4-g32-p1f": {**G32, **FREQ, "head_protect": 0.01},
    "h4-g32-p5f": {**G32, **FREQ, "head_protect": 0.05},
    "h4-g32-p1e": {**G32, "head_protect": 0.01},
    "h4-g32-k8": {**G32, "head_weak_columns": 8},
    "h3-g32": {"head_bits": 3, "head_groupsize": 32},
    "h3-g32-p1f": {"head_bits": 3, "head_groupsize": 32, **FREQ, "head_protect": 0.01},
    "h3-g32-p5f": {"head_bits": 3, "head_groupsize": 32, **FREQ, "head_protect": 0.05},
}
REFERENCES = ("gptq-3", "gptq-4")
# Whole-file budget rows, all at the bytes of the reference head row (equal whole-file bytes):
# its protected rows' bytes spent on weak columns instead, and everything ranked globally.
EQUAL_BYTES_OF = "h4-g32-p1f"
WHOLE: dict[str, dict] = {
    "whole-uniform-p0": {"allocation": "uniform", "head_bits": 4, "head_groupsize": 32},
    "whole-global": {"allocation": "global", "head_bits": 4, "head_groupsize": 32},
    "whole-global-p0": {  # the same ranking with no rows to buy: what the rows earn
        "allocation": "global",
        "head_bits": 4,
        "head_groupsize": 32,
        "head_protect_by": "none",
    },
}

EXAMPLES = """examples:
  python benchmarks/whole_model.py                      # every row (hours on 2 cores)
  python benchmarks/whole_model.py --heads h4 h4-p1 --references
  python benchmarks/whole_model.py --nsamples 16 --seqlen 256 --max-windows 8   # quick check
"""


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--heads", nargs="*", default=list(HEADS), choices=list(HEADS))
    p.add_argument("--references", nargs="*", default=list(REFERENCES), choices=REFERENCES)
    p.add_argument("--whole", nargs="*", default=list(WHOLE), choices=list(WHOLE))
    quality.add_protocol_args(p, Path("benchmarks/results/whole_model.json"))
    p.add_argument("--plot", type=Path, default=Path("benchmarks/results/whole_model.png"))
    return p.parse_args(argv)


class _Stop(Exception):
    pass


def head_stats(base: Path, args):
    """HeadStats of the base checkpoint on the calibration windows (cached in the work dir)."""
    import torch

    from owq.kernels.checkpoint import load_checkpoint
    from owq.kernels.families import family_of
    from owq.quantizer.calibration import calibration_windows, tokenize
    from owq.quantizer.hessian import HessianAccumulator
    from owq.quantizer.texts import calibration_text
    from owq.quantizer.vocab import HeadStats, token_counts

    cache = base / f"head-stats-n{args.nsamples}-s{args.seqlen}-seed{args.seed}.pt"
    if cache.is_file():
        return HeadStats(**torch.load(cache))
    from transformers import AutoTokenizer

    model = load_checkpoint(base)
    ids = tokenize(AutoTokenizer.from_pretrained(base), calibration_text("austen"))
    windows = calibration_windows(ids, args.nsamples, args.seqlen, args.seed)
    head = model.get_submodule(family_of(model.config).head)
    acc = HessianAccumulator(head.in_features)

    def grab(_module, inputs):
        acc.add(inputs[0])
        raise _Stop  # the head's own product is not needed

    handle = head.register_forward_pre_hook(grab)
    with torch.no_grad():
        for chunk in windows.split(8):
            try:
                model(chunk)
            except _Stop:
                pass
    handle.remove()
    stats = HeadStats(acc.hessian(), token_counts(windows, head.out_features))
    torch.save({"hessian": stats.hessian, "counts": stats.counts}, cache)
    return stats


def head_checkpoint(name: str, base: Path, stats, args) -> Path:
    from transformers import AutoTokenizer

    from owq.kernels.checkpoint import (
        QuantConfig,
        is_checkpoint,
        load_checkpoint,
        read_quant_config,
        save_checkpoint,
    )
    from owq.kernels.families import family_of
    from owq.quantizer.settings import QuantizeSettings
    from owq.quantizer.vocab import quantize_vocab

    out = args.work_dir / f"{BASE}-{name}-n{args.nsamples}-s{args.seqlen}-seed{args.seed}"
    if is_checkpoint(out):
        return out
    model = load_checkpoint(base)
    settings = QuantizeSettings(**quality.CONFIGS[BASE], **HEADS[name]).resolved()
    record = quantize_vocab(model, family_of(model.config), settings, stats)
    quant = read_quant_config(base)
    extra = {k: v for k, v in quant.items() if k not in ("quant_method", "format_version",
             "method", "bits", "group_size", "sym", "model_sha256")}  # fmt: skip
    extra |= {"head": HEADS[name], "head_record": record.__dict__}
    config = QuantConfig(quant["bits"], quant["group_size"], quant["sym"], quant["method"], extra)
    return save_checkpoint(model, out, config, AutoTokenizer.from_pretrained(base), overwrite=True)


def whole_checkpoint(name: str, target_bits: float, args) -> Path:
    """A full quantization with --budget whole at `target_bits` (the equal-bytes reference's)."""
    fields = {**quality.CONFIGS[BASE], **WHOLE[name], "budget": "whole", "target_bits": target_bits}
    return quality.checkpoint_for(name, fields, args)


def gguf_row(args, text: str, params: int) -> dict:
    """The Q4_1 GGUF the default model ships as: its perplexity is the fp baseline's; bits per
    weight over the same parameter count as our checkpoints (the tied table once)."""
    from owq.builtin.model import default_gguf_path

    row = quality.evaluate("fp", "default", args, text)
    size = default_gguf_path().stat().st_size
    return row | {
        "config": "gguf-q4_1",
        "file_bytes": size,
        "bits_per_weight_total": size * 8 / params,
    }


def evaluate_checkpoint(name: str, ckpt: Path, args, text: str) -> dict:
    row = quality.evaluate(name, str(ckpt), args, text)
    return {"config": name, **row}


def format_table(rows: list[dict], gguf_bytes: int) -> str:
    head = f"{'config':<16} {'ppl':>8} {'bits/w all':>10} {'MiB':>7} {'x GGUF':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['config']:<16} {r['ppl']:>8.3f} {r['bits_per_weight_total']:>10.3f} "
            f"{r['file_bytes'] / 2**20:>7.1f} {r['file_bytes'] / gguf_bytes:>7.3f}"
        )
    return "\n".join(lines)


def _scatter(ax, rows: list[dict], stagger: bool = False) -> None:
    for i, r in enumerate(sorted(rows, key=lambda r: r["ppl"])):
        ax.scatter(r["bits_per_weight_total"], r["ppl"])
        dy = (-10 if i % 2 else 4) if stagger else 3
        ax.annotate(r["config"], (r["bits_per_weight_total"], r["ppl"]), fontsize=7,
                    xytext=(4, dy), textcoords="offset points")  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return
    fig, (whole, zoom) = plt.subplots(1, 2, figsize=(11, 4.5))
    _scatter(whole, rows)
    whole.set_yscale("log")
    whole.set_title("every row (log scale)")
    near = [r for r in rows if r["bits_per_weight_total"] < 3.8]  # the whole-model low-bit rows
    _scatter(zoom, near, stagger=True)
    zoom.set_title("the low-bit rows")
    for ax in (whole, zoom):
        ax.set_xlabel("true bits per weight, whole file")
        ax.set_ylabel("Persuasion perplexity")
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M: quality against whole-file size")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    log.info("wrote %s", path)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from owq.kernels.bits import checkpoint_bits
    from owq.quantizer.texts import eval_text

    text = eval_text("persuasion")
    base = quality.checkpoint_for(BASE, quality.CONFIGS[BASE], args)
    gguf = gguf_row(args, text, checkpoint_bits(base).parameters)
    rows = [gguf, evaluate_checkpoint(BASE, base, args, text)]
    stats = head_stats(base, args) if args.heads else None
    for name in args.heads:
        rows.append(evaluate_checkpoint(name, head_checkpoint(name, base, stats, args), args, text))
    if args.whole:
        reference = head_checkpoint(EQUAL_BYTES_OF, base, stats or head_stats(base, args), args)
        bits = checkpoint_bits(reference).bits_per_weight_total
        for name in args.whole:
            ckpt = whole_checkpoint(name, bits, args)
            rows.append(evaluate_checkpoint(name, ckpt, args, text))
    for name in args.references:
        ckpt = quality.checkpoint_for(name, quality.CONFIGS[name], args)
        rows.append(evaluate_checkpoint(name, ckpt, args, text))
    print(format_table(rows, gguf["file_bytes"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(args).items()}
    args.json.write_text(json.dumps({"settings": settings, "results": rows}, indent=2) + "\n")
    plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
