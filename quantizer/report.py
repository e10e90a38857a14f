"""The run report: `owq_report.json` contents and the summary table printed at the end.

Knows the driver's `LayerRecord` and the bits accounting of a saved checkpoint; no algorithms.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict

from owq.kernels.bits import CheckpointBits

from .driver import LayerRecord
from .vocab import VocabRecord


def build_report(
    settings: dict,
    model: str,
    records: list[LayerRecord],
    seconds: dict[str, float],
    paper_bits: float,
    vocab: VocabRecord | None = None,
) -> dict:
    return {
        "model": model,
        "settings": settings,
        "seconds": seconds,
        "paper_bits": paper_bits,
        "weak_columns_total": sum(r.weak_columns for r in records),
        "layers": [asdict(r) for r in records],
        "vocab": None if vocab is None else asdict(vocab),
    }


def add_bits(report: dict, bits: CheckpointBits) -> dict:
    report["bits"] = {
        "nominal_bits_linear": bits.nominal_bits_linear,
        "bits_per_weight_linear": bits.bits_per_weight_linear,
        "bits_per_weight_total": bits.bits_per_weight_total,
        "file_bytes": bits.file_bytes,
    }
    return report


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def summary_table(report: dict) -> str:
    """Per layer type: count, mean weak columns, mean relative output error; then totals."""
    kinds: dict[str, list[dict]] = {}
    for layer in report["layers"]:
        kinds.setdefault(layer["kind"], []).append(layer)
    lines = [f"{'layer type':<24} {'layers':>6} {'in':>6} {'out':>6} {'mean k':>8} {'rel err':>10}"]
    for kind, layers in kinds.items():
        err = _mean([x["rel_error"] for x in layers])
        lines.append(
            f"{kind:<24} {len(layers):>6} {layers[0]['in_features']:>6} "
            f"{layers[0]['out_features']:>6} {_mean([x['weak_columns'] for x in layers]):>8.2f} "
            f"{'-' if err is None else f'{err:.3e}':>10}"
        )
    vocab = report.get("vocab")
    if vocab:
        err = vocab["rel_error"]
        lines.append(
            f"vocabulary table {vocab['rows']} x {vocab['dim']}: {vocab['bits']}-bit, group "
            f"{vocab['group_size']}, {vocab['protected_rows']} protected rows, "
            f"{vocab['weak_columns']} weak columns, rel err {'-' if err is None else f'{err:.3e}'}"
            f"{' (tied: one table for embedding and head)' if vocab['tied'] else ''}"
        )
    s, b = report["seconds"], report.get("bits", {})
    lines.append(
        f"total {s['total']:.1f}s (quantize {s['quantize']:.1f}s); weak columns "
        f"{report['weak_columns_total']}; paper bits {report['paper_bits']:.4f}"
    )
    if b:
        lines.append(
            f"bits/weight: nominal {b['nominal_bits_linear']:.4f} (codes + fp16 weak columns), "
            f"true linear {b['bits_per_weight_linear']:.4f}, true whole model "
            f"{b['bits_per_weight_total']:.4f}; file {b['file_bytes'] / 2**20:.1f} MiB"
        )
    return "\n".join(lines)
