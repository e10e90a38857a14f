"""The cached default checkpoint: made once, reused, and made again (with one log line saying
why) when it is truncated, fails its checksum or was quantized with other weak columns,
protected rows or settings.

The minutes-long real quantization is replaced by writing a tiny checkpoint; the built-in plan
by that checkpoint's plan (its fingerprint is what the cached default must have).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
from engine_fixtures import build_tiny_server_assets, tiny_quantized_model

import owq.default_checkpoint as dc
from owq.kernels.checkpoint import WEIGHTS_NAME, QuantConfig, load_checkpoint, save_checkpoint
from owq.kernels.plan import TablePlan, plan_of_checkpoint


@pytest.fixture
def fake_default(monkeypatch, tmp_path):
    """OWQ_CACHE in tmp_path; quantizing the default writes a tiny checkpoint; returns the list
    of checkpoints made."""
    source, _ = build_tiny_server_assets(tmp_path / "src", num_adapters=0)
    made = []

    def fake_quantize(out: Path, plan) -> None:
        assert plan == plan_of_checkpoint(source)
        config = QuantConfig(4, 32, extra=dict(dc.RECORDED))  # what the real default records
        save_checkpoint(load_checkpoint(source), out, config, overwrite=True)
        made.append(out)

    monkeypatch.setenv("OWQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dc, "_quantize_default", fake_quantize)
    monkeypatch.setattr(dc, "default_plan", lambda: plan_of_checkpoint(source))
    return made


def test_default_checkpoint_is_made_once_then_cached(fake_default, tmp_path):
    first = dc.default_checkpoint()
    assert first == tmp_path / "cache" / dc.CHECKPOINT_NAME and fake_default == [first]
    assert dc.default_checkpoint() == first and len(fake_default) == 1


def _truncate(weights: Path) -> None:
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _flip_last_byte(weights: Path) -> None:
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, reason",
    [(_truncate, "does not match its checksum"), (_flip_last_byte, "does not match its checksum")],
)
def test_a_damaged_cached_default_is_made_again(fake_default, caplog, damage, reason):
    path = dc.default_checkpoint()
    damage(path / WEIGHTS_NAME)
    assert dc.checkpoint_problem(path) is not None
    with caplog.at_level(logging.INFO, logger=dc.__name__):
        assert dc.default_checkpoint() == path
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and reason in warnings[0] and "quantizing it again" in warnings[0]
    assert len(fake_default) == 2 and dc.checkpoint_problem(path) is None
    load_checkpoint(path)  # loads again: owq serve starts


def test_a_default_made_with_other_weak_columns_is_made_again(fake_default, caplog):
    path = dc.default_checkpoint()
    other = tiny_quantized_model(seed=5)  # same shapes, other random weak columns
    save_checkpoint(other, path, QuantConfig(4, 32), overwrite=True)
    with caplog.at_level(logging.WARNING, logger=dc.__name__):
        dc.default_checkpoint()
    assert "made with other weak columns" in caplog.text and len(fake_default) == 2


def test_an_older_default_with_the_same_weak_columns_is_made_again(fake_default, caplog):
    """Same plan, other settings (the fp16-table default of before): made again, said once."""
    path = dc.default_checkpoint()
    save_checkpoint(load_checkpoint(path), path, QuantConfig(4, 32), overwrite=True)
    with caplog.at_level(logging.WARNING, logger=dc.__name__):
        assert dc.default_checkpoint() == path
    assert "made with other settings" in caplog.text and len(fake_default) == 2


def test_the_first_run_logs_its_expected_time(fake_default, caplog):
    with caplog.at_level(logging.INFO, logger=dc.__name__):
        dc.default_checkpoint()
    assert f"about {dc.FIRST_RUN_MINUTES_2_CORES} minutes on 2 CPU cores" in caplog.text
    assert "WARNING" not in caplog.text


def test_a_default_with_other_protected_rows_needs_making_again(fake_default):
    """Same weak columns, other protected vocabulary rows than the built-in plan lists."""
    path = dc.default_checkpoint()
    plan = dc.default_plan()
    assert dc.checkpoint_problem(path, plan) is None
    rows = replace(plan, tables=(TablePlan("lm_head", 96, (3, 5)),))
    assert dc.checkpoint_problem(path, rows) == (
        "made with other protected vocabulary rows (an older default)"
    )
