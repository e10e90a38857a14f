"""One budget for the whole file (`--budget whole`): `--target-bits` is the whole checkpoint's true
bits per weight, and what is left after the codes, scales, zero points and every other tensor is
spent on fp16 weak columns of the linears and protected rows of the vocabulary table.

The bytes of a plan are exact, not estimated: the planned tensors (every name, dtype and shape
the checkpoint will hold) are serialized empty with safetensors, header included. `uniform`
spends the budget on the paper's per-layer rule (Appendix D.2) with the protected rows
`--head-protect` asks for; `global` ranks every weak column of every linear and every row of the
vocabulary table by loss-unit benefit per byte (`fisher.py`; rows protected by frequency are
scored as a prefix of the frequency order, `prefix_scores`) and takes the best while they fit,
then trims or tops up against the exact size, so the file lands within one column or row of the
target. Knows the `Family` table and the allocation maths; nothing about the CLI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from owq.kernels.families import (
    Family,
    linear_shape,
    linear_weight,
    quantized_linear_paths,
    vocab_tables,
)
from owq.kernels.packing import num_groups
from owq.threads import single_thread

from .allocation import LayerShape, uniform_from_target
from .fisher import fisher_pass
from .settings import QuantizeSettings
from .vocab import row_saliency, token_counts
from .weak_columns import column_sensitivity

log = logging.getLogger(__name__)

FISHER_WINDOWS = 16


@dataclass(frozen=True)
class WholePlan:
    ks: dict[str, int]  # weak columns per quantized linear
    head_rows: int  # protected rows of the vocabulary table
    row_fisher: torch.Tensor | None  # f per vocabulary row (global): which rows to protect
    planned_bytes: int
    target_bytes: int


def _packed(prefix: str, in_f: int, out_f: int, bits: int, gs: int, k: int) -> dict:
    groups = num_groups(in_f, gs)
    return {
        f"{prefix}.qweight": ((in_f * bits // 32, out_f), torch.int32),
        f"{prefix}.scales": ((groups, out_f), torch.float16),
        f"{prefix}.qzeros": ((groups, -(-out_f // 32) * bits), torch.int32),
        f"{prefix}.outlier_idx": ((k,), torch.int32),
        f"{prefix}.oweight": ((k, out_f), torch.float16),
    }


def planned_tensors(
    model: nn.Module, family: Family, s: QuantizeSettings, ks: dict[str, int], head_rows: int
) -> dict[str, tuple[tuple, torch.dtype]]:
    """name -> (shape, dtype) of every tensor the checkpoint of this plan will hold."""
    vocab = s.head_bits != 16
    tables = vocab_tables(model, family)
    tied = len(tables) == 1
    planned, owned = {}, set()
    for path in quantized_linear_paths(model, family):
        module = model.get_submodule(path)
        in_f, out_f = linear_shape(module)
        planned |= _packed(path, in_f, out_f, s.wbits, s.groupsize, ks.get(path, 0))
        if getattr(module, "bias", None) is not None:
            planned[f"{path}.bias"] = ((out_f,), torch.float16)
        owned |= {f"{path}.weight", f"{path}.bias"}
    for path in tables if vocab else ():
        V, D = model.get_submodule(path).weight.shape
        planned |= _packed(path, D, V, s.head_bits, s.head_groupsize, s.head_weak_columns)
        planned[f"{path}.protected_idx"] = ((head_rows,), torch.int32)
        planned[f"{path}.protected_weight"] = ((head_rows, D), torch.float16)
    if vocab or tied:  # a quantized table, or a tied fp16 one stored once under the embedding
        owned |= {f"{family.head}.weight"} | ({f"{family.embed}.weight"} if vocab else set())
    for name, t in model.state_dict().items():
        if name not in owned:
            planned[name] = (tuple(t.shape), torch.float16 if t.is_floating_point() else t.dtype)
    return planned


def planned_bytes(planned: dict[str, tuple[tuple, torch.dtype]]) -> int:
    """The exact size of a safetensors file holding these tensors (header included)."""
    from safetensors.torch import save

    empty = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in planned.items()}
    return len(save(empty, metadata={"format": "pt"}))


def _target_bytes(model: nn.Module, s: QuantizeSettings) -> int:
    """Bytes of the whole file at `--target-bits` per weight (a tied table counts once, as in
    `kernels.bits`)."""
    params = sum(p.numel() for p in model.parameters())
    return int(s.target_bits * params / 8)


def _check_floor(fixed: int, target: int, s: QuantizeSettings, params_bits: float) -> None:
    if fixed > target:
        raise ValueError(
            f"--target-bits {s.target_bits} with --budget whole is below the "
            f"{params_bits:.3f} bits per weight the codes, scales and other tensors take alone"
        )


def uniform_whole(model, family, shapes: list[LayerShape], s: QuantizeSettings) -> WholePlan:
    """The largest uniform (Appendix D.2) weak-column plan that fits the whole-file target with
    the `--head-protect` rows."""
    rows = round(s.head_protect * model.get_output_embeddings().weight.shape[0]) if (
        s.head_bits != 16) else 0  # fmt: skip
    target = _target_bytes(model, s)
    fixed = planned_bytes(planned_tensors(model, family, s, {}, rows))
    _check_floor(fixed, target, s, fixed * s.target_bits / target)
    lo, hi, best, size = float(s.wbits), 16.0, {}, fixed
    for _ in range(30):  # bisection on the paper's per-linear target
        mid = (lo + hi) / 2
        ks = uniform_from_target(shapes, s.wbits, mid)
        planned = planned_bytes(planned_tensors(model, family, s, ks, rows))
        if planned <= target:
            lo, best, size = mid, ks, planned
        else:
            hi = mid
    return WholePlan(best, rows, None, size, target)


def prefix_scores(benefit: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Scores for items that can only be taken as a prefix of `order`: each item's benefit
    replaced by the mean of its block in the non-increasing fit along `order` (pool adjacent
    violators: the slopes of the least concave majorant of the cumulative benefit). Any greedy
    by score then takes a prefix, and a prefix that ends on a block boundary is valued at its
    true total benefit."""
    values = benefit[order].double().tolist()
    blocks: list[list[float]] = []  # [sum, count], means non-increasing
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    fitted = torch.cat([torch.full((int(n),), t / n, dtype=torch.float64) for t, n in blocks])
    out = torch.empty_like(fitted)
    out[order] = fitted
    return out


def _items(model, family, shapes, s: QuantizeSettings, stats, counts=None) -> tuple:
    """(score, cost in bytes, owner) of every candidate: each column of each linear (owner =
    the layer's index in `shapes`) and, with a quantized table, each vocabulary row (owner -1;
    none under `--head-protect-by none`).
    A row's score is its loss-unit benefit; under `--head-protect-by frequency` (`counts`: the
    calibration token counts) the quantizer protects the most frequent rows, so rows are scored
    as a prefix of that order: the budget values the rows that will be protected."""
    scores, costs, owners = [], [], []
    with single_thread():
        for i, shape in enumerate(shapes):
            W = linear_weight(model.get_submodule(shape.name)).to(torch.float32)
            st = stats[shape.name]
            scores.append(column_sensitivity(W, st.lam, s.wbits, s.groupsize, s.sym,
                                             bool(s.search), st.fisher).double())  # fmt: skip
            costs.append(torch.full((shape.in_features,), shape.out_features * 2 + 4))
            owners.append(torch.full((shape.in_features,), i))
        if s.head_bits != 16 and s.head_protect_by != "none":
            head = model.get_output_embeddings()
            st, table = stats[family.head], linear_weight(head).to(torch.float32)
            rows = row_saliency(table, st.lam, s.for_head(), None) * st.fisher
            if counts is not None:  # rows protected by frequency
                order = torch.sort(counts, descending=True, stable=True).indices
                rows = prefix_scores(rows, order)
            copies = len(vocab_tables(model, family))
            scores.append(rows.double())
            costs.append(torch.full((rows.numel(),), (table.shape[1] * 2 + 4) * copies))
            owners.append(torch.full((rows.numel(),), -1))
    return torch.cat(scores), torch.cat(costs), torch.cat(owners)


def global_whole(model, family, shapes: list[LayerShape], s: QuantizeSettings, windows,
                 progress: bool = True) -> WholePlan:  # fmt: skip
    """Weak columns and protected rows by loss-unit benefit per byte, to the exact target."""
    target = _target_bytes(model, s)
    fixed = planned_bytes(planned_tensors(model, family, s, {}, 0))
    _check_floor(fixed, target, s, fixed * s.target_bits / target)
    stats = fisher_pass(model, family, windows[:FISHER_WINDOWS], progress=progress)
    counts = None
    if s.head_bits != 16 and s.head_protect_by == "frequency":
        counts = token_counts(windows, linear_weight(model.get_output_embeddings()).shape[0])
    score, cost, owner = _items(model, family, shapes, s, stats, counts)
    order = torch.sort(score / cost, descending=True, stable=True).indices
    taken = torch.cumsum(cost[order], 0) <= target - fixed
    chosen = order[taken].tolist()
    rest = order[~taken].tolist()

    def plan_of(items: list[int]) -> tuple[dict[str, int], int]:
        counts = torch.bincount(owner[items] + 1, minlength=len(shapes) + 1).tolist()
        return {sh.name: counts[i + 1] for i, sh in enumerate(shapes)}, counts[0]

    def size_of(items: list[int]) -> int:
        ks, rows = plan_of(items)
        return planned_bytes(planned_tensors(model, family, s, ks, rows))

    size = size_of(chosen)
    while size > target and chosen:  # the header grew a little: give back the weakest
        chosen.pop()
        size = size_of(chosen)
    for item in rest:  # room left for a smaller item further down the ranking
        if size + int(cost[item]) <= target:
            trial = size_of([*chosen, item])
            if trial <= target:
                chosen.append(item)
                size = trial
    ks, rows = plan_of(chosen)
    head = stats.get(family.head)
    log.info("whole budget: %d of %d bytes, %d weak columns, %d protected rows", size, target,
             sum(ks.values()), rows)  # fmt: skip
    return WholePlan(ks, rows, None if head is None else head.fisher, size, target)


def whole_plan(model, family, shapes, s: QuantizeSettings, windows, progress=True) -> WholePlan:
    if s.allocation == "global":
        return global_whole(model, family, shapes, s, windows, progress)
    return uniform_whole(model, family, shapes, s)
