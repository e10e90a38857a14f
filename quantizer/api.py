"""`quantize(...)`: the one entry point that turns a float model into an OWQ checkpoint dir.

Used by `owq quantize`, the benchmarks and `owq serve` (its default checkpoint). Steps: load the
float model → round its unquantized parameters to fp16 (so calibration sees the stored model) →
calibration windows → weak columns per layer (k from the settings, or k and the columns from a
weak-column plan) → block-by-block quantization → save (atomic) → bits and
report. Knows the pipeline's modules; nothing about argument parsing or printing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from owq.kernels.bits import checkpoint_bits
from owq.kernels.checkpoint import QuantConfig, round_unquantized, save_checkpoint
from owq.kernels.families import Family, family_of, vocab_tables
from owq.kernels.plan import WeakColumnPlan

from .allocation import paper_bits
from .budget import whole_plan
from .calibration import calibration_windows, tokenize
from .capture import capture_block_inputs
from .driver import WeakColumnChoice, quantize_blocks
from .report import add_bits, build_report
from .settings import QuantizeSettings
from .vocab import head_stats, quantize_vocab
from .weak_counts import layer_shapes, weak_column_counts

log = logging.getLogger(__name__)


def _settings(
    settings: QuantizeSettings | None, fields: dict, plan: WeakColumnPlan | None
) -> QuantizeSettings:
    base = settings if settings is not None else QuantizeSettings()
    if plan is not None:
        fields = {"allocation": "plan", **fields}
    resolved = replace(base, **fields).resolved()
    if resolved.allocation == "plan" and plan is None:
        raise ValueError("allocation 'plan' needs a weak-column plan (--weak-columns-from)")
    return resolved


def _weak_columns(
    lm: nn.Module, family: Family, settings: QuantizeSettings, windows, plan, progress: bool
) -> WeakColumnChoice:
    if plan is None:
        return WeakColumnChoice(weak_column_counts(lm, family, settings, windows, progress))
    counts = {layer.name: layer.k for layer in plan.layers}
    given = {layer.name: torch.tensor(layer.weak_idx, dtype=torch.long) for layer in plan.layers}
    log.info("weak columns from plan %s (%d layers with k > 0)", plan.fingerprint,
             sum(1 for k in counts.values() if k))  # fmt: skip
    return WeakColumnChoice(counts, given)


def _plan_rows(lm: nn.Module, family: Family, settings: QuantizeSettings, plan):
    """The protected rows a plan gives each vocabulary table this run quantizes (PlanError if
    they do not fit; --head-protect must then be 0: the plan chose them), or None."""
    if plan is None or not plan.tables:
        return None
    if settings.head_bits == 16:
        log.info("the plan's protected rows are not used: the vocabulary table stays fp16")
        return None
    if settings.head_protect:
        raise ValueError("the plan gives the protected rows of the vocabulary table: drop "
                         "--head-protect")  # fmt: skip
    tables = vocab_tables(lm, family)
    plan.check_tables({path: lm.get_submodule(path).weight.shape[0] for path in tables})
    return {t.name: torch.tensor(t.protected_idx, dtype=torch.long) for t in plan.tables}


def _load(model, tokenizer):
    if isinstance(model, nn.Module):
        return model.eval(), tokenizer, type(model).__name__
    from owq.builtin.model import display_name, load_float_model

    lm, tok = load_float_model(str(model))
    return lm, tok, display_name(str(model))


def _windows(settings: QuantizeSettings, tokenizer, calibration_ids) -> torch.Tensor:
    if calibration_ids is None:
        from .texts import calibration_text

        if tokenizer is None:
            raise ValueError("a tokenizer (or calibration_ids) is needed for calibration")
        calibration_ids = tokenize(tokenizer, calibration_text(settings.calib))
    return calibration_windows(
        calibration_ids, settings.nsamples, settings.seqlen, settings.seed, settings.sampler
    )


def check_groups(shapes, groupsize: int) -> None:
    """ValueError before any work if the group size does not divide some layer's input width
    (the packed format needs whole groups)."""
    if groupsize == -1:
        return
    bad = [s for s in shapes if s.in_features % groupsize]
    if bad:
        widths = sorted({s.in_features for s in shapes})
        fits = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths)]
        raise ValueError(
            f"--groupsize {groupsize} does not divide in_features={bad[0].in_features} of "
            f"{bad[0].name} ({len(bad)} layers); group sizes that fit this model: "
            f"{', '.join(map(str, fits)) or 'none'} or -1"
        )


def quantize(
    model: str | os.PathLike | nn.Module = "default",
    out: str | os.PathLike = "owq-checkpoint",
    settings: QuantizeSettings | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    tokenizer=None,
    calibration_ids: torch.Tensor | None = None,
    plan: WeakColumnPlan | None = None,
    **fields,
) -> Path:
    """Quantize `model` ('default', an HF dir, a GGUF file, or a loaded model) into `out`.

    Settings come from `settings` and/or QuantizeSettings fields as keywords (method="owq",
    wbits=3, weak_columns=8, ...). `calibration_ids` (int64 [N]) bypasses the text + tokenizer.
    Returns the checkpoint dir. Raises FileExistsError if `out` exists and not `overwrite`.
    """
    settings = _settings(settings, fields, plan)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output path {out} exists (use --overwrite to replace it)")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    lm, tokenizer, name = _load(model, tokenizer)
    family = family_of(lm.config)
    round_unquantized(lm)
    shapes = layer_shapes(lm, family)
    check_groups(shapes, settings.groupsize)
    if plan is not None:  # PlanError (one line) before any calibration work
        plan.check_fits({s.name: (s.in_features, s.out_features) for s in shapes})
    given = _plan_rows(lm, family, settings, plan)
    seconds["load"] = time.perf_counter() - t0
    t = time.perf_counter()
    with torch.inference_mode():
        windows = (
            _windows(settings, tokenizer, calibration_ids) if settings.needs_calibration else None
        )
        whole = None
        if settings.budget == "whole":
            whole = whole_plan(lm, family, shapes, settings, windows, progress)
            weak = WeakColumnChoice(whole.ks)
        else:
            weak = _weak_columns(lm, family, settings, windows, plan, progress)
        seconds["plan"] = time.perf_counter() - t
        t = time.perf_counter()
        inputs = None
        if windows is not None:
            inputs = capture_block_inputs(lm, family, windows, settings.batch_size)
        records = quantize_blocks(lm, family, settings, inputs, weak, progress)
        stats = None
        if settings.head_bits != 16 and inputs is not None:
            fisher = whole.row_fisher if whole is not None else None
            stats = head_stats(lm, family, inputs.hidden, windows, fisher)
        del inputs
        vocab = quantize_vocab(lm, family, settings, stats, whole and whole.head_rows, given)
    seconds["quantize"] = time.perf_counter() - t
    report = build_report(
        settings.to_dict(), name, records, seconds,
        paper_bits(shapes, {r.name: r.weak_columns for r in records}, settings.wbits), vocab,
    )  # fmt: skip

    def final_report(written: Path) -> dict:  # in the temp dir, before it is renamed into place
        seconds["save"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t0
        return add_bits(report, checkpoint_bits(written))

    t = time.perf_counter()
    save_checkpoint(lm, out, _quant_config(settings), tokenizer, final_report, overwrite=overwrite)
    log.info("wrote %s in %.1fs", out, seconds["total"])
    return out


def _quant_config(settings: QuantizeSettings) -> QuantConfig:
    extra = {
        "target_bits": settings.target_bits,
        "weak_columns": settings.weak_columns,
        "allocation": settings.allocation,
        "budget": settings.budget,
        "search": settings.search,
        "act_order": settings.act_order,
        "true_sequential": settings.true_sequential,
    }
    if settings.head_bits != 16:
        extra |= {
            "head_bits": settings.head_bits,
            "head_group_size": settings.head_groupsize,
            "head_protect": settings.head_protect,
            "head_protect_by": settings.head_protect_by,
            "head_weak_columns": settings.head_weak_columns,
        }
    return QuantConfig(settings.wbits, settings.groupsize, settings.sym, settings.method, extra)


def read_report(checkpoint: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint) / "owq_report.json").read_text())
