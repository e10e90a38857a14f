"""`owq tune`: weak column tuning of an owq checkpoint on jsonl task data -> an adapter dir."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  owq tune ckpt/owq-3 qa.jsonl --out adapters/qa                 # {"prompt","completion"} lines
  owq tune ckpt/owq-3 austen.jsonl --out adapters/austen --epochs 2 --lr 5e-4
  owq tune ckpt/owq-3 train.jsonl --eval-data test.jsonl --out adapters/novels \\
      --max-steps 200 --batch-size 8 --grad-accum 2 --layers attn --name novels

data: one JSON object per line, {"prompt": ..., "completion": ...} (loss on the completion and
EOS only) or {"text": ...} (loss on every token). Only the weak columns (oweight) of the chosen
layers train, through fp32 master copies; the adapter stores them as fp16.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="weak column tuning: train a per-task adapter on a frozen OWQ base",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CKPT", help="an owq checkpoint dir (the frozen base)")
    p.add_argument("data", metavar="DATA.jsonl", type=Path, help="training data")
    p.add_argument("--out", required=True, type=Path, help="adapter dir to write")
    p.add_argument("--name", default=None, help="task/adapter name (default: the --out dir name)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps; beats --epochs")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument(
        "--max-len", type=int, default=None, help="longest example in tokens (default: context)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-data", type=Path, default=None, help="jsonl scored after every epoch")
    p.add_argument("--layers", choices=("all", "attn", "mlp"), default="all")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _config(args, context: int):
    from owq.quantizer.tuning.tune import TuneConfig

    max_len = args.max_len or context
    if max_len > context:
        raise ValueError(f"--max-len {max_len} exceeds the model's context of {context} tokens")
    return TuneConfig(
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_len=max_len,
        seed=args.seed,
        layers=args.layers,
    )


def _context(model) -> int:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)


def run(args) -> int:
    from transformers import AutoTokenizer

    from owq.kernels.adapters import save_adapter
    from owq.kernels.checkpoint import load_checkpoint
    from owq.quantizer.tuning.data import load_examples, pad_id_of
    from owq.quantizer.tuning.tune import make_adapter, tune_weak_columns

    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"adapter path {args.out} exists (pass --overwrite to replace it)")
    model = load_checkpoint(args.checkpoint)
    cfg = _config(args, _context(model))
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    train_examples = load_examples(args.data, tokenizer, cfg.max_len)
    eval_examples = (
        load_examples(args.eval_data, tokenizer, cfg.max_len) if args.eval_data else None
    )
    log.info("%d training examples from %s", len(train_examples), args.data)
    layers, result = tune_weak_columns(
        model, train_examples, cfg, eval_examples, pad_id_of(tokenizer), not args.no_progress
    )
    name = args.name or args.out.name
    adapter = make_adapter(
        model,
        layers,
        name,
        cfg,
        result,
        base_checkpoint=str(Path(args.checkpoint).resolve().name),
        data=str(args.data),
        eval_data=str(args.eval_data) if args.eval_data else None,
    )
    save_adapter(adapter, args.out, overwrite=args.overwrite)
    print(_summary(args.out, adapter, result))
    return 0


def _summary(out: Path, adapter, result) -> str:
    mib = 2**20
    lines = [
        f"adapter {adapter.name!r} -> {out} ({adapter.num_bytes / mib:.2f} MiB, "
        f"{len(adapter.columns)} layers, base {adapter.base_fingerprint})",
        f"steps {result.steps}, tokens {result.input_tokens}, {result.seconds:.1f} s, "
        f"loss {result.first_loss:.4f} -> {result.final_loss:.4f}",
        f"peak RSS {result.peak_rss_bytes / mib:.0f} MiB (of which the CPU inference cache of "
        f"dequantized dense weights {result.dense_cache_bytes / mib:.0f} MiB)",
    ]
    for e in result.evals:
        lines.append(
            f"eval epoch {e['epoch']} step {e['step']}: loss {e['loss']:.4f}, "
            f"token accuracy {e['token_accuracy']:.3f}, exact match {e['exact_match']:.3f}"
        )
    return "\n".join(lines)
