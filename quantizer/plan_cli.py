"""`owq plan export CKPT PLAN.json`: write a checkpoint's weak-column plan (indices per layer).

A plan file (a few KB) lets `owq quantize --weak-columns-from PLAN.json` re-quantize a base (more
calibration data, another group size, a newer owq) with the same weak columns, so every adapter
tuned on the old base fits the new one, and the same protected vocabulary rows (used with
--head-bits). Reads the checkpoint's tensors only; builds no model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  owq plan export ckpt/owq-3 owq-3.plan.json      # weak-column indices of every layer
  owq quantize default ckpt/owq-3-g128 --groupsize 128 --weak-columns-from owq-3.plan.json
  owq quantize default ckpt/owq-3-more --nsamples 256 --weak-columns-from ckpt/owq-3
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="weak-column plans: export a checkpoint's weak columns to reuse them",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser(
        "export",
        help="write the weak-column indices of every layer of CKPT to PLAN.json",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("checkpoint", metavar="CKPT", type=Path, help="an owq checkpoint dir")
    export.add_argument("out", metavar="PLAN.json", type=Path, help="plan file to write")
    export.add_argument("--overwrite", action="store_true", help="replace PLAN.json if it exists")
    export.set_defaults(run=run_export)


def run_export(args) -> int:
    from owq.kernels.plan import plan_of_checkpoint, write_plan

    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"plan file {args.out} exists (use --overwrite to replace it)")
    plan = plan_of_checkpoint(args.checkpoint)
    write_plan(plan, args.out)
    weak = [layer for layer in plan.layers if layer.k]
    print(
        f"wrote {args.out}: {len(plan.layers)} layers, {len(weak)} with weak columns "
        f"({plan.weak_columns} in all), {plan.protected_rows} protected vocabulary rows, "
        f"fingerprint {plan.fingerprint}"
    )
    return 0
