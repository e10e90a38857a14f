"""`owq eval`: perplexity of one or more models on held-out text, as a table and JSON."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  owq eval default                                   # fp baseline on Persuasion
  owq eval default ckpt/owq-3.05 ckpt/gptq-3 --json results.json
  owq eval ckpt/owq-3 --text my_text.txt --seqlen 1024 --max-windows 32
  owq eval ckpt/owq-3-h4 --compare-gguf model.Q4_1.gguf    # size relative to a GGUF file
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity over non-overlapping windows",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="'default', an HF dir, a GGUF file or an owq checkpoint",
    )
    p.add_argument(
        "--adapter", default=None, help="weak-column adapter dir applied to each checkpoint"
    )
    p.add_argument("--text", default="persuasion", help="'persuasion' (held out) or a text file")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    p.add_argument(
        "--compare-gguf",
        type=Path,
        default=None,
        metavar="FILE",
        help="add a column: each checkpoint's file size relative to this GGUF file",
    )
    p.set_defaults(run=run)


def evaluate_one(
    model_arg: str, text: str, seqlen: int, max_windows: int | None, adapter=None
) -> dict:
    import torch

    from owq.kernels.bits import checkpoint_bits
    from owq.kernels.checkpoint import is_checkpoint
    from owq.quantizer.models import load_model
    from owq.quantizer.perplexity import perplexity

    model, tokenizer, name = load_model(model_arg)
    if adapter is not None:
        from owq.quantizer.adapters import apply_adapter

        apply_adapter(model, adapter)
    ids = torch.tensor(tokenizer(text).input_ids)
    result = perplexity(model, ids, seqlen, max_windows)
    row = {"model": model_arg, "name": name, "ppl": result.ppl, "tokens": result.tokens}
    if Path(model_arg).is_dir() and is_checkpoint(model_arg):
        bits = checkpoint_bits(model_arg)
        row |= {
            "bits_per_weight_linear": bits.bits_per_weight_linear,
            "bits_per_weight_total": bits.bits_per_weight_total,
            "file_bytes": bits.file_bytes,
        }
    else:
        row |= {"bits_per_weight_linear": 16.0, "bits_per_weight_total": 16.0, "file_bytes": None}
    return row


def format_table(rows: list[dict], gguf_bytes: int | None = None) -> str:
    """ppl, tokens, true bits per weight of the linears and of the whole file, size in MiB, and
    with `gguf_bytes` the size relative to that GGUF file."""
    head = (
        f"{'model':<40} {'ppl':>10} {'tokens':>8} {'bits/w lin':>10} {'bits/w all':>10} {'MiB':>8}"
    )
    lines = [head + (f" {'x GGUF':>7}" if gguf_bytes else "")]
    for r in rows:
        size = f"{r['file_bytes'] / 2**20:8.1f}" if r["file_bytes"] else f"{'-':>8}"
        line = (
            f"{r['model'][-40:]:<40} {r['ppl']:>10.3f} {r['tokens']:>8} "
            f"{r['bits_per_weight_linear']:>10.3f} {r['bits_per_weight_total']:>10.3f} {size}"
        )
        if gguf_bytes:
            ratio = r["gguf_ratio"]
            line += f" {ratio:>7.3f}" if ratio else f" {'-':>7}"
        lines.append(line)
    return "\n".join(lines)


def run(args) -> int:
    from owq.quantizer.texts import eval_text

    text = eval_text(args.text)
    gguf_bytes = None
    if args.compare_gguf is not None:
        if not args.compare_gguf.is_file():
            raise FileNotFoundError(f"--compare-gguf {args.compare_gguf} does not exist")
        gguf_bytes = args.compare_gguf.stat().st_size
    rows = [evaluate_one(m, text, args.seqlen, args.max_windows, args.adapter) for m in args.models]
    for row in rows:
        row["gguf_ratio"] = (
            row["file_bytes"] / gguf_bytes if gguf_bytes and row["file_bytes"] else None
        )
    print(format_table(rows, gguf_bytes))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": rows}, indent=2) + "\n")
        log.info("wrote %s", args.json)
    return 0
