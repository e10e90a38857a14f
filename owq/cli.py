"""The `owq` command line: one parser, subcommands registered by each package.

Each subcommand module exposes `add_parser(subparsers)` (argparse only, no heavy imports) and
sets `run(args) -> int`. Expected failures (missing model, corpus, bad checkpoint, bad input)
print one line `owq: error: ...` and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = (
    "owq.quantizer.quantize_cli",
    "owq.quantizer.eval_cli",
    "owq.quantizer.tuning.cli",
    "owq.quantizer.adapters_cli",
    "owq.quantizer.plan_cli",
    "owq.server.cli",
    "owq.doctor",
)

EXAMPLES = """examples:
  owq quantize default ckpt/owq-3.05 --target-bits 3.05   # OWQ 3-bit + fp16 weak columns
  owq eval default                       # perplexity of the built-in model on Persuasion
  owq tune ckpt/owq-3 task.jsonl --out adapters/task   # weak column tuning -> adapter dir
  owq adapters inspect adapters/task     # size, task, base fingerprint, training settings
  owq plan export ckpt/owq-3 plan.json   # weak columns per layer, for --weak-columns-from
  owq serve ckpt/owq-3 --adapters adapters/   # OpenAI-compatible server on 127.0.0.1:8000
  owq doctor                             # check this install (what a bug report needs)
  owq <command> --help                   # examples for each command
"""


class UsageError(Exception):
    """A user mistake the CLI reports in one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="owq",
        description="OWQ: quantize, tune weak-column adapters, serve.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def expected_errors() -> tuple[type[BaseException], ...]:
    from owq.builtin.corpus import CorpusMissing
    from owq.builtin.model import ModelMissing
    from owq.kernels.checkpoint import CheckpointError

    return (
        UsageError,
        CorpusMissing,
        ModelMissing,
        CheckpointError,
        FileExistsError,
        FileNotFoundError,
        ValueError,
    )


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from owq.default_checkpoint import default_adapters_dir, default_checkpoint

    args.default_checkpoint, args.default_adapters_dir = default_checkpoint, default_adapters_dir
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args) or 0)
    except expected_errors() as e:
        print(f"owq: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("owq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
