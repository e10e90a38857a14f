"""A plan's protected vocabulary rows: exported with the weak columns, kept by a re-quantization.

A base quantized with `--head-bits` and protected rows lists them in its plan (every quantized
table: a tied one once, under the head; an untied embedding too). Re-quantizing from that plan
with other calibration data keeps the rows, where selection would pick others; the rows stay out
of the fingerprint (adapters never touch the tables). Plans whose rows do not fit, or that clash
with --head-protect, are refused in one line before any work, and write nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from owq.kernels.checkpoint import load_checkpoint
from owq.kernels.plan import (
    PlanError,
    TablePlan,
    plan_of_checkpoint,
    plan_of_model,
    read_plan_file,
    write_plan,
)
from owq.quantizer.api import quantize

HEAD = {"head_bits": 4, "head_groupsize": 32}
ROWS = round(0.05 * VOCAB)


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3000,), generator=torch.Generator().manual_seed(seed))


def _quantize(kind, out, seed, **fields):
    return quantize(
        tiny_model(kind), out, calibration_ids=_ids(seed), nsamples=6, seqlen=48, wbits=4,
        progress=False, **HEAD, **fields,
    )  # fmt: skip


def _selected(kind, out, seed):
    return _quantize(kind, out, seed, weak_columns=2, head_protect=0.05,
                     head_protect_by="frequency")  # fmt: skip


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {kind: _selected(kind, root / kind, 1) for kind in ("llama", "mistral")}


@pytest.mark.parametrize("kind, tables", [
    ("llama", ["lm_head"]), ("mistral", ["lm_head", "model.embed_tokens"]),
])  # fmt: skip
def test_requantizing_from_a_plan_keeps_every_tables_protected_rows(bases, tmp_path, kind, tables):
    base = bases[kind]
    plan = plan_of_checkpoint(base)
    assert [t.name for t in plan.tables] == tables
    assert all(t.rows == VOCAB and len(t.protected_idx) == ROWS for t in plan.tables)
    assert plan == plan_of_model(load_checkpoint(base))
    assert plan.fingerprint == replace(plan, tables=()).fingerprint  # rows: not in the fingerprint
    selected = _selected(kind, tmp_path / "selected", 7)  # other text: other rows, other columns
    assert plan_of_checkpoint(selected).tables != plan.tables
    for source in (plan, read_plan_file(write_plan(plan, tmp_path / "p.json"))):
        again = _quantize(kind, tmp_path / f"again-{id(source)}", 7, plan=source)
        assert plan_of_checkpoint(again) == plan
        model = load_checkpoint(again)
        head = model.get_output_embeddings()
        assert head.protected_idx.tolist() == list(plan.table("lm_head").protected_idx)


def test_a_plan_without_protected_rows_is_written_as_before(bases, tmp_path):
    plan = plan_of_checkpoint(bases["llama"])
    text = write_plan(replace(plan, tables=()), tmp_path / "p.json").read_text()
    assert "tables" not in json.loads(text) and text.endswith("\n]}\n")
    assert '"tables": [' in write_plan(plan, tmp_path / "q.json").read_text()


def test_plan_rows_and_head_protect_are_refused_together(bases, tmp_path):
    plan = plan_of_checkpoint(bases["llama"])
    with pytest.raises(ValueError, match="drop --head-protect"):
        _quantize("llama", tmp_path / "o", 1, plan=plan, head_protect=0.05)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("tables, message", [
    ((TablePlan("lm_head", VOCAB + 4, (1, 2)),), "table lm_head has 96 rows here, 100 in the plan"),
    ((TablePlan("model.embed_tokens", VOCAB, (1, 2)),), "which this run does not quantize"),
])  # fmt: skip
def test_a_plan_whose_rows_do_not_fit_is_refused(bases, tmp_path, tables, message):
    plan = replace(plan_of_checkpoint(bases["llama"]), tables=tables)  # llama: a tied table
    with pytest.raises(PlanError, match=message):
        _quantize("llama", tmp_path / "o", 1, plan=plan)
    assert not (tmp_path / "o").exists()


def test_plan_rows_are_not_used_for_an_fp16_table(bases, tmp_path, caplog):
    plan = plan_of_checkpoint(bases["llama"])
    with caplog.at_level(logging.INFO, logger="owq.quantizer.api"):
        out = quantize(tiny_model("llama"), tmp_path / "o", calibration_ids=_ids(1), nsamples=6,
                       seqlen=48, wbits=4, progress=False, plan=plan)  # fmt: skip
    assert plan_of_checkpoint(out) == replace(plan, tables=())
    assert "protected rows are not used" in caplog.text


def test_rows_outside_the_table_are_refused_when_read(bases, tmp_path):
    path = write_plan(plan_of_checkpoint(bases["llama"]), tmp_path / "p.json")
    data = json.loads(path.read_text())
    data["tables"][0]["protected_idx"][-1] = VOCAB
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="table lm_head: protected_idx"):
        read_plan_file(path)
