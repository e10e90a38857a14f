"""Checkpoints and adapters are written atomically with modes any container user can read.

`kernels.atomic.replace_dir` gives dirs 0755 and files 0644 under the usual umask (stricter under a
stricter one), never leaves a half-written dir after an exception, and keeps the old dir when
the new one fails. `save_checkpoint` records the served name; the engine and `owq serve` use it.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
from engine_fixtures import random_adapter, tiny_quantized_model, tiny_tokenizer

import owq.kernels.adapters as adapters_module
from owq.kernels.adapters import load_adapter, save_adapter
from owq.kernels.atomic import replace_dir
from owq.kernels.checkpoint import QuantConfig, checkpoint_name, save_checkpoint


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def modes(root) -> dict[str, int]:
    """{relative path: permission bits} for root and everything under it."""
    out = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for path in root.rglob("*"):
        out[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return out


def fill(tmp):
    (tmp / "a.json").write_text("{}")
    (tmp / "sub").mkdir(mode=0o700)
    fd = os.open(tmp / "sub" / "w.bin", os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)


def test_modes_are_0755_and_0644_even_for_private_files(tmp_path, umask):
    umask(0o022)
    with replace_dir(tmp_path / "out") as tmp:
        fill(tmp)
    assert modes(tmp_path / "out") == {
        ".": 0o755,
        "a.json": 0o644,
        "sub": 0o755,
        "sub/w.bin": 0o644,
    }


def test_a_stricter_umask_is_respected(tmp_path, umask):
    umask(0o077)
    with replace_dir(tmp_path / "out") as tmp:
        fill(tmp)
    assert set(modes(tmp_path / "out").values()) == {0o700, 0o600}


def test_an_exception_leaves_no_dir_and_no_temp(tmp_path):
    with pytest.raises(RuntimeError, match="disk full"):
        with replace_dir(tmp_path / "out") as tmp:
            fill(tmp)
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_an_exception_keeps_the_old_dir_whole(tmp_path):
    with replace_dir(tmp_path / "out") as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with replace_dir(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["v"]
    assert (tmp_path / "out" / "v").read_text() == "1"


def test_overwrite_replaces_and_removes_the_old_dir(tmp_path):
    with replace_dir(tmp_path / "out") as tmp:
        (tmp / "old").write_text("1")
    with pytest.raises(FileExistsError, match="exists"):
        with replace_dir(tmp_path / "out"):
            pass
    with replace_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new").write_text("2")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new"]


def test_checkpoint_is_readable_by_anyone_and_records_its_name(tmp_path, umask):
    umask(0o022)
    out = save_checkpoint(
        tiny_quantized_model(), tmp_path / "my-owq3", QuantConfig(4, 32), tiny_tokenizer()
    )
    found = modes(out)
    assert found.pop(".") == 0o755 and found and set(found.values()) == {0o644}
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["name"] == "my-owq3"
    (tmp_path / "mounted").symlink_to(out)  # a mount's own name does not change the id
    assert checkpoint_name(tmp_path / "mounted") == "my-owq3"


def test_checkpoint_without_a_name_falls_back_to_its_dir(tmp_path):
    ckpt = tmp_path / "old-ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"quantization_config": {"bits": 3}}))
    assert checkpoint_name(ckpt) == "old-ckpt"


def test_adapter_write_is_atomic_and_readable(tmp_path, umask, monkeypatch):
    umask(0o022)
    base = tiny_quantized_model()
    out = save_adapter(random_adapter(base, "task", seed=1), tmp_path / "task")
    assert set(modes(out).values()) == {0o755, 0o644}
    before = (out / "adapter.safetensors").read_bytes()

    def fail_midway(tensors, path, metadata=None):
        open(path, "wb").write(b"half")
        raise OSError("no space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", fail_midway)
    with pytest.raises(OSError, match="no space"):
        save_adapter(random_adapter(base, "task", seed=2), out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["task"]
    assert (out / "adapter.safetensors").read_bytes() == before
    assert load_adapter(out).name == "task"
    assert adapters_module.replace_dir is replace_dir  # one writer for checkpoints and adapters
