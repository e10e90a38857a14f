"""Weak-column plans: which weights of a base stay fp16, and the base fingerprint.

A plan lists every quantized linear of a base's blocks: its name, shape (in, out) and the sorted
indices of its weak columns (empty when k = 0). It also lists the protected rows of each
quantized vocabulary table (name, row count, sorted row indices), so that a re-quantized base
keeps every fp16 choice of the old one. It is read from a loaded model (`OWQLinear.outlier_idx`,
`OWQVocab.protected_idx`), from a checkpoint's tensors (no model is built) or from a plan file (a
small JSON), and all three give the same plan. The base fingerprint is a hash of the layers with
k > 0 (name, shape, indices), not of the tables, which adapters never touch: adapters store it
and are refused on a base with another one, so a base re-quantized with the same plan
(`owq quantize --weak-columns-from`) keeps its adapters. Knows the checkpoint files and the
layers' tensor names; nothing about how the columns or rows were chosen.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from .checkpoint import PACKED_PARTS, WEIGHTS_NAME, CheckpointError, read_owq_config
from .families import Family, family_of
from .owq_linear import OWQLinear
from .owq_vocab import OWQVocab
from .packing import stored_layout
from .types import index_problem

PLAN_FORMAT = "owq-weak-column-plan"
PLAN_VERSION = 1


class PlanError(ValueError):
    """A plan that cannot be read or does not fit a model; one line naming the problem."""


@dataclass(frozen=True)
class LayerPlan:
    name: str
    in_features: int
    out_features: int
    weak_idx: tuple[int, ...]  # sorted, unique, each in [0, in_features)

    @property
    def k(self) -> int:
        return len(self.weak_idx)

    def to_dict(self) -> dict:
        return {"name": self.name, "in": self.in_features, "out": self.out_features,
                "weak_idx": list(self.weak_idx)}  # fmt: skip


@dataclass(frozen=True)
class TablePlan:
    """The protected (fp16) rows of a quantized vocabulary table [rows, D]."""

    name: str
    rows: int
    protected_idx: tuple[int, ...]  # sorted, unique, each in [0, rows)

    def to_dict(self) -> dict:
        return {"name": self.name, "rows": self.rows, "protected_idx": list(self.protected_idx)}


def _natural_key(name: str) -> tuple:
    """'model.layers.2.x' before 'model.layers.10.x'."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


@dataclass(frozen=True)
class WeakColumnPlan:
    layers: tuple[LayerPlan, ...]  # in natural name order
    tables: tuple[TablePlan, ...] = ()  # vocabulary tables with protected rows, by name

    @classmethod
    def of(cls, layers, tables=()) -> WeakColumnPlan:
        key = lambda entry: _natural_key(entry.name)  # noqa: E731
        return cls(tuple(sorted(layers, key=key)), tuple(sorted(tables, key=key)))

    def table(self, name: str) -> TablePlan | None:
        return next((t for t in self.tables if t.name == name), None)

    @property
    def weak_columns(self) -> int:
        """Weak columns over every layer."""
        return sum(layer.k for layer in self.layers)

    @property
    def protected_rows(self) -> int:
        """Protected rows over every vocabulary table."""
        return sum(len(t.protected_idx) for t in self.tables)

    @property
    def fingerprint(self) -> str:
        """sha256 (16 hex digits) over the layers with k > 0: name, in x out, indices."""
        digest = hashlib.sha256()
        for layer in self.layers:
            if layer.k:
                idx = ",".join(map(str, layer.weak_idx))
                digest.update(
                    f"{layer.name}:{layer.in_features}x{layer.out_features}:{idx}\n".encode()
                )
        return digest.hexdigest()[:16]

    def by_name(self) -> dict[str, LayerPlan]:
        return {layer.name: layer for layer in self.layers}

    def check_fits(self, shapes: dict[str, tuple[int, int]]) -> None:
        """PlanError naming the first layer (model order) whose name or (in, out) differs."""
        mine = self.by_name()
        for name, (in_f, out_f) in shapes.items():
            layer = mine.get(name)
            if layer is None:
                raise PlanError(f"the plan does not fit this model: it has no layer {name}")
            if (layer.in_features, layer.out_features) != (in_f, out_f):
                raise PlanError(
                    f"the plan does not fit this model: layer {name} is {in_f}x{out_f} here, "
                    f"{layer.in_features}x{layer.out_features} in the plan"
                )
        extra = [layer.name for layer in self.layers if layer.name not in shapes]
        if extra:
            raise PlanError(f"the plan does not fit this model: it has no layer {extra[0]}")

    def check_tables(self, rows: dict[str, int]) -> None:
        """PlanError if a table with protected rows is not among `rows` (name -> vocabulary
        size of the tables this model quantizes) or has another size."""
        for table in self.tables:
            if table.name not in rows:
                raise PlanError(
                    f"the plan protects rows of {table.name}, which this run does not quantize "
                    "(a tied table is stored once, under the head)"
                )
            if rows[table.name] != table.rows:
                raise PlanError(
                    f"the plan does not fit this model: table {table.name} has "
                    f"{rows[table.name]} rows here, {table.rows} in the plan"
                )


def _checked_layer(entry, where: str) -> LayerPlan:
    try:
        layer = LayerPlan(
            str(entry["name"]), int(entry["in"]), int(entry["out"]),
            tuple(int(i) for i in entry["weak_idx"]),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"{where}: a layer needs name, in, out and weak_idx ({e!r})") from None
    if problem := index_problem(torch.tensor(layer.weak_idx, dtype=torch.long), layer.in_features):
        raise PlanError(f"{where}: layer {layer.name}: weak_idx {problem}")
    return layer


def _checked_table(entry, where: str) -> TablePlan:
    try:
        table = TablePlan(
            str(entry["name"]), int(entry["rows"]), tuple(int(i) for i in entry["protected_idx"])
        )
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"{where}: a table needs name, rows and protected_idx ({e!r})") from None
    if problem := index_problem(torch.tensor(table.protected_idx, dtype=torch.long), table.rows):
        raise PlanError(f"{where}: table {table.name}: protected_idx {problem}")
    return table


def plan_of_model(model: nn.Module) -> WeakColumnPlan:
    """The plan of a model whose quantized linears are OWQLinear (and tables OWQVocab)."""
    layers, tables = [], []
    for name, m in model.named_modules():
        if isinstance(m, OWQVocab):
            if m.num_protected:
                tables.append(TablePlan(name, m.out_features, tuple(m.protected_idx.tolist())))
        elif isinstance(m, OWQLinear):
            layers.append(
                LayerPlan(name, m.in_features, m.out_features, tuple(m.outlier_idx.tolist()))
            )
    return WeakColumnPlan.of(layers, tables)


def _stored_plan(names, shape_of, idx_of, family) -> WeakColumnPlan:
    """The plan from stored tensors: `shape_of(key)` their shapes (None when absent),
    `idx_of(key)` an index tensor's values."""
    layers, tables = [], []
    for name in names:
        parts = (torch.empty(shape_of(f"{name}.{p}"), device="meta") for p in PACKED_PARTS)
        in_f, out_f, _, _ = stored_layout(*parts)
        if name.startswith(family.blocks + "."):
            key = f"{name}.outlier_idx"
            weak = idx_of(key) if shape_of(key) is not None else []
            layers.append(LayerPlan(name, in_f, out_f, tuple(weak)))
        elif shape_of(f"{name}.protected_idx") not in (None, (0,)):  # a table's protected rows
            tables.append(TablePlan(name, out_f, tuple(idx_of(f"{name}.protected_idx"))))
    return WeakColumnPlan.of(layers, tables)


def _quantized_names(keys) -> list[str]:
    return [k.removesuffix(".qweight") for k in keys if k.endswith(".qweight")]


def plan_of_tensors(tensors: dict[str, torch.Tensor], family: Family) -> WeakColumnPlan:
    """The plan of a checkpoint's loaded tensors."""

    def shape_of(key: str):
        return tuple(tensors[key].shape) if key in tensors else None

    idx_of = lambda key: tensors[key].tolist()  # noqa: E731
    return _stored_plan(_quantized_names(tensors), shape_of, idx_of, family)


def plan_of_checkpoint(path: str | os.PathLike) -> WeakColumnPlan:
    """The plan of a checkpoint dir from its tensor shapes and `outlier_idx` (no model built, no
    other tensor read)."""
    from safetensors import safe_open

    path = Path(path)
    model_type = read_owq_config(path).get("model_type")
    family = family_of(SimpleNamespace(model_type=model_type))
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS_NAME}")
    try:
        with safe_open(str(weights), "pt") as f:
            keys = set(f.keys())

            def shape_of(key: str):
                return tuple(f.get_slice(key).get_shape()) if key in keys else None

            idx_of = lambda key: f.get_tensor(key).tolist()  # noqa: E731
            return _stored_plan(_quantized_names(keys), shape_of, idx_of, family)
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{weights} cannot be read: {e}") from None


def read_plan_file(path: str | os.PathLike) -> WeakColumnPlan:
    """A plan JSON file, checked (format, indices, and its recorded fingerprint)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"{path} cannot be read as a plan: {e}") from None
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        raise PlanError(f'{path} is not a weak-column plan (no "format": "{PLAN_FORMAT}")')
    if data.get("version") != PLAN_VERSION:
        raise PlanError(f"{path}: unknown plan version {data.get('version')!r}")
    layers = (_checked_layer(e, str(path)) for e in data.get("layers", []))
    tables = (_checked_table(e, str(path)) for e in data.get("tables", []))
    plan = WeakColumnPlan.of(layers, tables)
    if data.get("fingerprint") not in (None, plan.fingerprint):
        raise PlanError(
            f"{path}: recorded fingerprint {data['fingerprint']} but the layers hash to "
            f"{plan.fingerprint} (edited file?)"
        )
    return plan


def read_plan(source: str | os.PathLike) -> WeakColumnPlan:
    """The plan of a checkpoint dir or a plan file."""
    source = Path(source)
    if source.is_dir():
        return plan_of_checkpoint(source)
    if source.is_file():
        return read_plan_file(source)
    raise FileNotFoundError(f"{source} is neither a checkpoint dir nor a plan file")


def write_plan(plan: WeakColumnPlan, path: str | os.PathLike) -> Path:
    """Write a plan file atomically: one layer per line, the fingerprint on top."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(layer.to_dict()) for layer in plan.layers]
    text = (
        f'{{"format": "{PLAN_FORMAT}", "version": {PLAN_VERSION}, '
        f'"fingerprint": "{plan.fingerprint}", "layers": [\n  ' + ",\n  ".join(lines) + "\n]"
    )
    if plan.tables:  # absent without protected rows: such files are as they always were
        tables = [json.dumps(table.to_dict()) for table in plan.tables]
        text += ', "tables": [\n  ' + ",\n  ".join(tables) + "\n]"
    text += "}\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # opened as usual: umask modes
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
