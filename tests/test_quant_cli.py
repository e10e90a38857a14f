"""`owq quantize` from the command line: success on a tiny model dir, and one-line errors."""

from __future__ import annotations

import pytest
from quant_helpers import synthetic_text, tiny_model_dir

from owq.cli import main
from owq.kernels.checkpoint import is_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir("llama", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(synthetic_text(6000))
    return path


def _fail(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("owq: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def test_quantize_cli_writes_a_checkpoint_and_a_summary(tmp_path, model_dir, calib, capsys):
    out = tmp_path / "ckpt"
    argv = ["quantize", str(model_dir), str(out), "--calib", str(calib), "--nsamples", "4"]
    argv += ["--seqlen", "64", "--weak-columns", "2", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert is_checkpoint(out) and (out / "owq_report.json").is_file()
    assert "self_attn.q_proj" in printed and "true linear" in printed
    message = _fail(capsys, argv)  # the output now exists
    assert "exists" in message and "--overwrite" in message
    assert main(argv + ["--overwrite"]) == 0


def test_unknown_model_path(tmp_path, capsys):
    message = _fail(capsys, ["quantize", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert "nope" in message


def test_bad_wbits(tmp_path, model_dir, capsys):
    message = _fail(capsys, ["quantize", str(model_dir), str(tmp_path / "o"), "--wbits", "5"])
    assert "--wbits" in message


def test_target_bits_below_wbits(tmp_path, model_dir, capsys):
    argv = ["quantize", str(model_dir), str(tmp_path / "o"), "--wbits", "4", "--target-bits", "3.5"]
    assert "--target-bits" in _fail(capsys, argv)


def test_weak_columns_need_owq(tmp_path, model_dir, capsys):
    argv = ["quantize", str(model_dir), str(tmp_path / "o"), "--method", "gptq"]
    assert "--method owq" in _fail(capsys, argv + ["--weak-columns", "4"])


def test_text_too_short_for_one_window(tmp_path, model_dir, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    argv = ["quantize", str(model_dir), str(tmp_path / "o"), "--calib", str(short)]
    message = _fail(capsys, argv + ["--seqlen", "64"])
    assert "fewer than one window" in message
    assert not (tmp_path / "o").exists()


def test_group_size_that_does_not_divide_a_layer(tmp_path, model_dir, calib, capsys):
    """Refused before any calibration work, naming the layer width and the sizes that fit."""
    argv = ["quantize", str(model_dir), str(tmp_path / "o"), "--calib", str(calib)]
    message = _fail(capsys, argv + ["--method", "gptq", "--groupsize", "128"])
    assert "--groupsize 128" in message and "in_features=64" in message and "32, 64" in message
    assert not (tmp_path / "o").exists()


def test_missing_calibration_file(tmp_path, model_dir, capsys):
    argv = ["quantize", str(model_dir), str(tmp_path / "o"), "--calib", str(tmp_path / "x.txt")]
    assert "x.txt" in _fail(capsys, argv)


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--help"])
    assert exc.value.code == 0
    assert "owq quantize default" in capsys.readouterr().out
