"""`owq doctor`: passes on this install (with a smoke generation), fails with a FAIL line naming
the fix when the corpus is missing or a shipped adapter does not fit the built-in default."""

from __future__ import annotations

import json

import pytest
from engine_fixtures import build_tiny_server_assets

import owq.default_checkpoint as dc
from owq.builtin import corpus
from owq.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_server_assets(tmp_path_factory.mktemp("doctor"), num_adapters=1)


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("OWQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _lines(capsys) -> tuple[list[str], str]:
    captured = capsys.readouterr()
    return captured.out.splitlines(), captured.err


def test_passes_on_a_good_install(tiny, empty_cache, capsys):
    ckpt, _ = tiny
    assert main(["doctor", str(ckpt)]) == 0
    out, _ = _lines(capsys)
    assert not [line for line in out if line.startswith("[FAIL]")], out
    topics = {line[7:].split()[0] for line in out if line.startswith("[")}
    expected = {"versions", "cpu", "gpu", "default", "corpus", "built-in", "cache", "adapters"}
    assert expected <= topics
    smoke = next(line for line in out if "smoke" in line)
    assert "16 tokens in" in smoke and "tokens/s" in smoke and out[-1] == "owq doctor: all good"
    assert str(empty_cache) in next(line for line in out if " cache " in line)


def test_fails_on_a_missing_corpus(monkeypatch, empty_cache, tmp_path, capsys):
    monkeypatch.setenv(corpus.RDATA_ENV, str(tmp_path / "no" / "Rdata.rdb"))
    assert main(["doctor", "--no-smoke"]) == 1
    out, err = _lines(capsys)
    fail = [line for line in out if line.startswith("[FAIL]")]
    assert len(fail) == 1 and "corpus" in fail[0] and corpus.INSTALL_HINT in fail[0]
    assert "1 problem(s)" in err


def test_fails_on_a_shipped_adapter_for_another_base(tiny, monkeypatch, empty_cache, capsys):
    _, adapters = tiny
    monkeypatch.setattr(dc, "default_adapters_dir", lambda: adapters)
    assert main(["doctor", "--no-smoke", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    fail = [f for f in report["findings"] if f["status"] == "FAIL"]
    assert not report["ok"] and [f["topic"] for f in fail] == ["adapters"]
    assert "adapter-0" in fail[0]["detail"] and "does NOT fit" in fail[0]["detail"]


def test_a_damaged_cached_default_is_a_warning_not_a_failure(empty_cache, capsys):
    broken = empty_cache / dc.CHECKPOINT_NAME
    broken.mkdir(parents=True)
    (broken / "config.json").write_text('{"quantization_config": {"quant_method": "owq"}}')
    assert main(["doctor", "--no-smoke"]) == 0
    out, _ = _lines(capsys)
    line = next(line for line in out if dc.CHECKPOINT_NAME + ":" in line)
    assert line.startswith("[warn]") and "owq serve makes it again" in line
