"""`owq quantize`: argument parsing and printing around `owq.quantizer.api.quantize`."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  owq quantize default ckpt/owq-3.05 --method owq --wbits 3 --target-bits 3.05
  owq quantize default ckpt/owq-k8 --method owq --wbits 3 --weak-columns 8
  owq quantize default ckpt/owq-3.05-global --target-bits 3.05 --allocation global
  owq quantize default ckpt/owq-3-g128 --groupsize 128 --weak-columns-from ckpt/owq-k8
  owq quantize default ckpt/owq-3-more --nsamples 256 --weak-columns-from owq-k8.plan.json
  owq quantize default ckpt/gptq-3 --method gptq --wbits 3
  owq quantize default ckpt/gptq-3-ao-ts --method gptq --wbits 3 --act-order --true-sequential
  owq quantize default ckpt/gptq-3-search --method gptq --wbits 3 --search
  owq quantize default ckpt/owq-3.05-minmax --method owq --target-bits 3.05 --minmax
  owq quantize default ckpt/rtn-4-g128 --method rtn --wbits 4 --groupsize 128
  owq quantize default ckpt/owq-3-h4 --target-bits 3.05 --head-bits 4 --head-protect 0.01
  owq quantize default ckpt/whole-3.4 --budget whole --target-bits 3.4 --allocation global \
      --head-bits 4 --head-groupsize 32    # the whole file at 3.4 bits per weight
  owq quantize path/to/hf_dir out/ --calib my_text.txt --nsamples 32 --seqlen 256 --overwrite
  owq eval ckpt/owq-3.05 ckpt/gptq-3                 # then compare perplexities
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a model with RTN, GPTQ or OWQ into a checkpoint dir",
        description="Quantize MODEL block by block on calibration text and write OUT.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="'default', a local HF dir or a GGUF file")
    p.add_argument("out", metavar="OUT", help="checkpoint dir to write (refused if it exists)")
    p.add_argument("--method", choices=("rtn", "gptq", "owq"), default="owq")
    p.add_argument("--wbits", type=int, default=3, help="2, 3 or 4 bits for the dense part")
    k = p.add_mutually_exclusive_group()
    k.add_argument(
        "--target-bits",
        type=float,
        default=None,
        help="OWQ average bit-width incl. fp16 weak columns (paper's t; default wbits + 0.05)",
    )
    k.add_argument("--weak-columns", type=int, default=None, help="OWQ: fixed k per layer")
    p.add_argument(
        "--weak-columns-from",
        metavar="CKPT|PLAN.json",
        default=None,
        help="OWQ: the weak columns of every layer from another checkpoint or a plan file "
        "(`owq plan export`), so adapters tuned on that base fit this one; with --head-bits, "
        "also the protected vocabulary rows it lists",
    )
    p.add_argument(
        "--allocation",
        choices=("uniform", "global"),
        default=None,
        help="uniform (default): paper Appendix D.2; global: one sensitivity ranking across layers",
    )
    p.add_argument(
        "--budget",
        choices=("linear", "whole"),
        default="linear",
        help="what --target-bits counts: the linears (the paper's bits) or the whole file's true "
        "bits per weight, spent on weak columns and protected head rows",
    )
    p.add_argument("--groupsize", type=int, default=-1, help="-1 (per channel), 32, 64 or 128")
    p.add_argument("--act-order", action="store_true", help="GPTQ columns by descending diag(H)")
    p.add_argument(
        "--true-sequential",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="H of each group of linears from the already-quantized earlier groups; one forward "
        "per block instead of two (default: on for owq, off for gptq)",
    )
    p.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    scales = p.add_mutually_exclusive_group()
    scales.add_argument(
        "--search",
        dest="search",
        action="store_const",
        const=True,
        default=None,
        help="truncation grid search for scale/zero (default for owq)",
    )
    scales.add_argument(
        "--minmax",
        "--no-search",
        dest="search",
        action="store_const",
        const=False,
        help="min-max scale/zero (default for rtn and gptq)",
    )
    p.add_argument("--percdamp", type=float, default=0.01, help="GPTQ dampening, x mean diag(H)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the window offsets")
    p.add_argument(
        "--sampler",
        choices=("torch", "python"),
        default="torch",
        help="window offsets: torch.randint (default) or Python's random.randint as the GPTQ/OWQ "
        "reference scripts draw them (same seed, same windows as theirs)",
    )
    p.add_argument("--calib", default="austen", help="'austen' (five novels) or a text file")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (speed only)")
    _add_head_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--compare-gguf",
        type=Path,
        default=None,
        metavar="FILE",
        help="also print the checkpoint's size relative to this GGUF file",
    )
    p.set_defaults(run=run)


def _add_head_arguments(p) -> None:
    head = p.add_argument_group("vocabulary table (LM head, and a tied or untied embedding)")
    head.add_argument(
        "--head-bits", type=int, default=16, help="16 keeps it fp16 (default); 8, 4, 3 or 2"
    )
    head.add_argument("--head-groupsize", type=int, default=-1, help="-1 (per row), 32, 64, 128")
    head.add_argument(
        "--head-protect",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="fraction of vocabulary rows kept whole in fp16 (e.g. 0.01)",
    )
    head.add_argument(
        "--head-protect-by",
        choices=("error", "frequency", "none"),
        default="error",
        help="rank rows by λ-weighted quantization error or by calibration frequency (with "
        "--allocation global the budget then buys a prefix of the frequency order, valued at "
        "those rows' loss-unit benefit); none: no protected rows, and --allocation global "
        "spends the whole budget on weak columns",
    )
    head.add_argument(
        "--head-weak-columns", type=int, default=0, metavar="K", help="fp16 weak columns (head)"
    )


def settings_from_args(args):
    from owq.quantizer.settings import QuantizeSettings

    return QuantizeSettings(
        method=args.method,
        wbits=args.wbits,
        target_bits=args.target_bits,
        weak_columns=args.weak_columns,
        allocation=args.allocation or "uniform",
        budget=args.budget,
        groupsize=args.groupsize,
        act_order=args.act_order,
        true_sequential=args.true_sequential,
        sym=args.sym,
        search=args.search,
        percdamp=args.percdamp,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        sampler=args.sampler,
        calib=args.calib,
        batch_size=args.batch_size,
        head_bits=args.head_bits,
        head_groupsize=args.head_groupsize,
        head_protect=args.head_protect,
        head_protect_by=args.head_protect_by,
        head_weak_columns=args.head_weak_columns,
    )


def _check_paths(args) -> None:
    from pathlib import Path

    from owq.builtin.model import resolve_source

    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"output path {args.out} exists (use --overwrite to replace it)")
    resolve_source(args.model)  # ModelMissing (one line) before any heavy import
    if args.compare_gguf is not None and not args.compare_gguf.is_file():
        raise FileNotFoundError(f"--compare-gguf {args.compare_gguf} does not exist")
    if args.calib != "austen" and not Path(args.calib).is_file():
        raise FileNotFoundError(f"calibration text {args.calib} does not exist")


def _plan(args):
    """The weak-column plan of --weak-columns-from, or None; refuses the options it replaces."""
    if args.weak_columns_from is None:
        return None
    if args.allocation is not None:
        raise ValueError("--weak-columns-from gives k per layer: drop --allocation")
    from owq.kernels.plan import read_plan

    return read_plan(args.weak_columns_from)


def run(args) -> int:
    settings = settings_from_args(args)
    if args.weak_columns_from is not None:
        settings = replace(settings, allocation="plan")
    settings = settings.resolved()  # ValueError: one line, exit 2
    _check_paths(args)
    plan = _plan(args)
    from transformers.utils import logging as hf_logging

    from owq.quantizer.api import quantize, read_report

    hf_logging.disable_progress_bar()  # our own bars per block; keeps errors to one line
    from owq.quantizer.report import summary_table

    out = quantize(
        args.model, args.out, settings, overwrite=args.overwrite, progress=not args.quiet, plan=plan
    )
    report = read_report(out)
    print(summary_table(report))
    if args.compare_gguf is not None:
        size = report["bits"]["file_bytes"]
        ratio = size / args.compare_gguf.stat().st_size
        print(f"size: {size / 2**20:.1f} MiB = {ratio:.3f} x {args.compare_gguf.name}")
    print(f"wrote {out}")
    return 0
