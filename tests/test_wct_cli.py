"""`owq tune`, `owq adapters inspect` and `owq eval --adapter` on a tiny checkpoint: bad data named
by line, the adapter round trip, and a mismatched base refused with both fingerprints."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoTokenizer

from owq.cli import main
from owq.kernels.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from owq.kernels.checkpoint import base_fingerprint, load_checkpoint
from owq.quantizer.adapters import AdapterUsageError, apply_adapter
from owq.quantizer.tuning.data import DataError, load_examples
from tests.test_wct_support import make_checkpoint, single_thread, task_records, write_records

__all__ = ["single_thread"]

TUNE_ARGS = ["--epochs", "3", "--lr", "1e-2", "--batch-size", "3", "--max-len", "64"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli") / "base")


@pytest.fixture(scope="module")
def adapter_dir(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    data = write_records(root / "task.jsonl", task_records())
    out = root / "novels"
    argv = ["tune", str(checkpoint), str(data), "--out", str(out), "--eval-data", str(data)]
    assert main([*argv, "--name", "novels", "--no-progress", *TUNE_ARGS]) == 0
    return out


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ('{"prompt": "Anne Elliot"}', 'missing field "completion"'),
    ('{"completion": "emma"}', 'missing field "prompt"'),
    ('{"prompt": "Anne", "completion": ""}', '"completion" is empty'),
    ('{"prompt": 3, "completion": "emma"}', '"prompt" must be a string'),
    ('{"question": "x"}', 'needs "text" or "prompt" and "completion"'),
    ('["text"]', "expected a JSON object"),
    (
        json.dumps({"prompt": " ".join(["Anne"] * 80), "completion": "emma"}),
        "prompt 80 . completion 2 tokens .with EOS. = 82, longer than the context .--max-len 64.; "
        "the prompt alone is too long",
    ),
    (
        json.dumps({"prompt": "Anne", "completion": " ".join(["emma"] * 70)}),
        "the completion alone is too long",
    ),
    (
        json.dumps({"prompt": " ".join(["Anne"] * 40), "completion": " ".join(["emma"] * 30)}),
        "shorten the prompt .the longer side.",
    ),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_bad_data_names_the_line(checkpoint, tmp_path, line, message):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    good = json.dumps(task_records()[0])
    path = tmp_path / "data.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(DataError, match=message) as info:
        load_examples(path, tokenizer, max_len=64)
    assert f"{path}:4:" in str(info.value)


def test_a_long_text_record_trains_as_windows(checkpoint, tmp_path, caplog):
    """2,000 tokens with --max-len 256: 8 windows (7 x 256 + 208), stated in the log."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    words = " ".join(s["prompt"] for s in task_records()).split()
    text = " ".join((words * 100)[:2000])
    assert len(tokenizer(text).input_ids) == 2000
    data = write_records(tmp_path / "book.jsonl", [{"text": text}])
    out = tmp_path / "book"
    argv = ["tune", str(checkpoint), str(data), "--out", str(out), "--no-progress"]
    with caplog.at_level(logging.INFO):
        assert main([*argv, "--max-len", "256", "--batch-size", "4", "--lr", "1e-2"]) == 0
    assert "1 text records longer than --max-len 256 split into 8 windows" in caplog.text
    result = load_adapter(out).config["result"]
    assert result["steps"] == 2 and result["input_tokens"] == 2000
    assert result["target_tokens"] == 2000 - 8  # each window's first token is not predicted


def test_a_pair_that_does_not_fit_exits_2_with_one_line(checkpoint, tmp_path, capsys):
    data = write_records(tmp_path / "long.jsonl", [{"prompt": "Anne " * 300, "completion": "x"}])
    code = main(["tune", str(checkpoint), str(data), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{data}:1: prompt 300 + completion" in err[0]
    assert "the prompt alone is too long" in err[0] and not (tmp_path / "a").exists()


def test_bad_data_exits_2_with_one_line(checkpoint, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(task_records()[0]) + "\n{oops\n")
    code = main(["tune", str(checkpoint), str(data), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and f"{data}:2: invalid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()


def test_empty_file_is_refused(checkpoint, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="is empty"):
        load_examples(path, AutoTokenizer.from_pretrained(checkpoint), max_len=64)


def test_adapter_round_trip(checkpoint, adapter_dir, tmp_path):
    assert sorted(p.name for p in adapter_dir.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    adapter = load_adapter(adapter_dir)
    base = load_checkpoint(checkpoint)
    assert adapter.name == "novels" and adapter.config["task"] == "novels"
    assert adapter.base_fingerprint == base_fingerprint(base)
    assert adapter.config["training"]["lr"] == 1e-2 and adapter.config["training"]["epochs"] == 3
    assert adapter.config["result"]["steps"] == 9 and adapter.config["result"]["peak_rss_bytes"] > 0
    assert len(adapter.config["result"]["evals"]) == 3
    apply_adapter(base, adapter_dir)
    again = load_checkpoint(checkpoint)
    for name, columns in adapter.columns.items():
        assert columns.dtype == torch.float16
        assert torch.equal(base.get_submodule(name).oweight, columns)
        assert not torch.equal(again.get_submodule(name).oweight, columns)


def test_existing_out_needs_overwrite(checkpoint, tmp_path, capsys):
    data = write_records(tmp_path / "task.jsonl", task_records())
    out = tmp_path / "adapter"
    argv = ["tune", str(checkpoint), str(data), "--out", str(out), "--no-progress"]
    assert main([*argv, "--max-steps", "1"]) == 0
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--max-steps", "2", "--overwrite"]) == 0
    assert load_adapter(out).config["result"]["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "task.jsonl"]  # no temp left


def test_inspect_prints_size_task_base_and_settings(adapter_dir, capsys):
    assert main(["adapters", "inspect", str(adapter_dir)]) == 0
    out = capsys.readouterr().out
    adapter = load_adapter(adapter_dir)
    size = sum(p.stat().st_size for p in adapter_dir.iterdir())
    for needle in ("novels", adapter.base_fingerprint, f"{size} bytes", "lr", "batch_size"):
        assert needle in out, needle
    assert main(["adapters", "inspect", str(adapter_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes_on_disk"] == size and info["training"]["batch_size"] == 3


def test_mismatched_base_is_refused_naming_both(adapter_dir, tmp_path, capsys):
    other = make_checkpoint(tmp_path / "other", seed=1)
    theirs = base_fingerprint(load_checkpoint(other))
    ours = load_adapter(adapter_dir).base_fingerprint
    assert theirs != ours
    with pytest.raises(AdapterUsageError) as info:
        apply_adapter(load_checkpoint(other), adapter_dir)
    assert ours in str(info.value) and theirs in str(info.value)
    text = tmp_path / "text.txt"
    text.write_text("Anne Elliot was nobody with either father or sister . " * 4)
    argv = ["eval", str(other), "--adapter", str(adapter_dir), "--text", str(text), "--seqlen", "8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert ours in err and theirs in err
    assert main(["adapters", "inspect", str(adapter_dir), "--base", str(other)]) == 1
    assert "DOES NOT fit" in capsys.readouterr().out
    assert main(["adapters", "inspect", str(adapter_dir), "--base", str(other), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["fits_base"] is False


def test_inspect_with_the_right_base_exits_zero(adapter_dir, checkpoint, capsys):
    assert main(["adapters", "inspect", str(adapter_dir), "--base", str(checkpoint)]) == 0
    assert "fits base" in capsys.readouterr().out


def test_not_an_adapter_is_one_line(tmp_path, capsys):
    assert main(["adapters", "inspect", str(tmp_path)]) == 2
    assert "is not an adapter" in capsys.readouterr().err
