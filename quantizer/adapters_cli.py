"""`owq adapters inspect DIR`: what a weak-column adapter holds and how it was trained."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES = """examples:
  owq adapters inspect adapters/novels
  owq adapters inspect adapters/novels --base ckpt/owq-3     # exit status 1 if it does not fit
  owq adapters inspect examples/adapters/austen-domain --json
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "adapters",
        help="inspect weak-column adapters",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    inspect = actions.add_parser(
        "inspect",
        help="size, task, base fingerprint and training settings of an adapter dir",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("adapter", metavar="DIR", type=Path)
    inspect.add_argument(
        "--base", default=None, help="owq checkpoint or plan file to check the adapter against"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(run=run_inspect)


def describe(path: Path) -> dict:
    from owq.quantizer.adapters import read_adapter

    adapter = read_adapter(path)
    shapes = {tuple(t.shape) for t in adapter.columns.values()}
    config = dict(adapter.config)
    return {
        "path": str(path),
        "name": adapter.name,
        "task": config.pop("task", None),
        "base_fingerprint": adapter.base_fingerprint,
        "format_version": config.pop("format_version", None),
        "bytes_on_disk": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "tensor_bytes": adapter.num_bytes,
        "layers": len(adapter.columns),
        "weak_columns": sorted({s[0] for s in shapes}),
        "parameters": sum(t.numel() for t in adapter.columns.values()),
        "training": config.pop("training", {}),
        "other": config,
    }


def _base_check(info: dict, base: str) -> tuple[bool, str]:
    """(fits, one line saying so) for the adapter described by `info` on `base`."""
    from owq.kernels.plan import read_plan

    fingerprint = read_plan(base).fingerprint  # a checkpoint's tensors or a plan file
    if fingerprint == info["base_fingerprint"]:
        return True, f"fits base {base} ({fingerprint})"
    theirs = info["base_fingerprint"]
    return False, f"DOES NOT fit base {base}: adapter base {theirs}, this base {fingerprint}"


def format_info(info: dict) -> str:
    mib = 2**20
    lines = [
        f"adapter          {info['name']}  ({info['path']})",
        f"task             {info['task']}",
        f"base fingerprint {info['base_fingerprint']}",
        f"size on disk     {info['bytes_on_disk']} bytes ({info['bytes_on_disk'] / mib:.2f} MiB)",
        f"weak columns     {info['parameters']} fp16 parameters in {info['layers']} layers, "
        f"k = {', '.join(map(str, info['weak_columns']))}",
        "training:",
    ]
    lines += [f"  {key:<15}{value}" for key, value in sorted(info["training"].items())]
    result = info["other"].get("result") or {}
    for key in ("steps", "input_tokens", "seconds", "first_loss", "final_loss", "peak_rss_bytes"):
        if key in result:
            lines.append(f"  {key:<15}{result[key]}")
    for e in result.get("evals", []):
        lines.append(
            f"  eval epoch {e['epoch']}: loss {e['loss']:.4f}, exact match {e['exact_match']:.3f}"
        )
    return "\n".join(lines)


def run_inspect(args) -> int:
    """Exit status 0, or 1 when `--base` is given and the adapter does not fit it."""
    info = describe(args.adapter)
    fits = True
    if args.base:
        fits, info["base_check"] = _base_check(info, args.base)
        info["fits_base"] = fits
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_info(info) + (f"\n{info['base_check']}" if args.base else ""))
    return 0 if fits else 1
