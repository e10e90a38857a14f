"""A checkpoint or adapter write killed midway (SIGKILL: no cleanup runs) leaves its temp dir
beside OUT; the next write of OUT removes it, and the temp dirs of writers from before temp dirs
carried their process id, while a live writer's temp dir is kept. OUT is never half-written."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from engine_fixtures import random_adapter, tiny_quantized_model

from owq.kernels.adapters import save_adapter
from owq.kernels.checkpoint import QuantConfig, save_checkpoint

KILLED_WRITER = """
import os, signal, sys
from owq.kernels.atomic import replace_dir
with replace_dir(sys.argv[1]) as tmp:
    (tmp / "model.safetensors").write_bytes(b"half of a file")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_write(out) -> None:
    code = textwrap.dedent(KILLED_WRITER)
    result = subprocess.run([sys.executable, "-c", code, str(out)], check=False)
    assert result.returncode == -9


def leftovers(parent, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_a_killed_checkpoint_write_is_cleaned_by_the_next(tmp_path):
    out = tmp_path / "ckpt"
    live = Path(tempfile.mkdtemp(prefix=f".ckpt.tmp-{os.getpid()}-", dir=tmp_path))  # alive
    killed_write(out)
    (tmp_path / ".ckpt.k3x9_a2b").mkdir()  # a writer from before temp dirs named their process
    assert len(leftovers(tmp_path, "ckpt")) == 3 and not out.exists()
    save_checkpoint(tiny_quantized_model("llama"), out, QuantConfig(4, 32))
    assert leftovers(tmp_path, "ckpt") == [live.name]
    assert (out / "model.safetensors").stat().st_size > 1000
    os.rmdir(live)


def test_a_killed_adapter_write_is_cleaned_by_the_next(tmp_path):
    out = tmp_path / "adapter"
    killed_write(out)
    assert len(leftovers(tmp_path, "adapter")) == 1
    save_adapter(random_adapter(tiny_quantized_model("llama"), "adapter", seed=1), out)
    assert leftovers(tmp_path, "adapter") == [] and (out / "adapter.safetensors").is_file()
