"""`owq serve`: help, argument errors as one line, the api-keys file, the default checkpoint's
cache path, and a real `owq serve CKPT` process that serves and shuts down gracefully on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_server_harness import tiny_assets

from owq.cli import main
from owq.default_checkpoint import CHECKPOINT_NAME, default_checkpoint_path
from owq.server.auth import KeyFileError, KeyTable


def test_help_lists_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--api-keys" in out and "--adapters" in out


def test_not_a_checkpoint_is_one_line_error(tmp_path, capsys):
    assert main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("owq: error:")


@pytest.mark.parametrize(
    "content, words",
    [
        ("{", "not valid JSON"),
        ('{"keys": {}}', "keys"),
        ('{"keys": {"sk": {"admin": "maybe"}}}', "admin"),
        ('{"keys": {"sk": {"tenants": []}}}', "tenants"),
    ],
)
def test_bad_api_keys_file(tmp_path, content, words):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(KeyFileError, match=words):
        KeyTable.from_file(path)


def test_api_keys_file_grants(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": {"sk-a": {"adapters": ["x"]}, "sk-o": {"admin": True}}}))
    table = KeyTable.from_file(path)
    a, ops = table.lookup("sk-a"), table.lookup("sk-o")
    assert a.may_use(None) and a.may_use("x") and not a.may_use("y") and not a.admin
    assert ops.admin and ops.may_use("y")
    assert table.lookup("sk-nope") is None


def test_default_checkpoint_lives_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("OWQ_CACHE", str(tmp_path))
    assert default_checkpoint_path() == tmp_path / CHECKPOINT_NAME


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_owq_serve_process_serves_and_stops_gracefully(tmp_path):
    ckpt, adapters = tiny_assets(tmp_path, num_adapters=1)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "owq",
        "serve",
        str(ckpt),
        "--adapters",
        str(adapters),
        "--port",
        str(port),
        "--max-batch",
        "2",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert [m["id"] for m in models][1:] == ["adapter-0"]  # preloaded from --adapters
        body = {"prompt": "It is", "max_tokens": 3, "model": "adapter-0"}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "OPEN" in out  # the start-up warning of a server without api keys


def test_serve_on_a_taken_port_exits_1(tmp_path):
    """uvicorn cannot bind: the model loop stops too and the process exits 1, saying so."""
    ckpt, _ = tiny_assets(tmp_path, num_adapters=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "owq", "serve", str(ckpt), "--port", str(port)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "did not start" in done.stderr


def test_serving_benchmark_quick_mode(tmp_path):
    """`benchmarks/serving.py --quick` on the tiny checkpoint: every scenario ran, JSON written."""
    ckpt, _ = tiny_assets(tmp_path, num_adapters=0)
    out = tmp_path / "serving.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "serving.py"
    cmd = [
        sys.executable,
        str(script),
        "--quick",
        "--ckpt",
        str(ckpt),
        "--no-transformers",
        "--no-llama-cpp",
        "--max-tokens",
        "4",
        "--json",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    names = [s["name"] for s in report["scenarios"]]
    assert names == [
        "owq, batch 1 greedy",
        "owq base, 4 clients",
        "owq 4 adapters",
        "owq one adapter",
    ]
    assert all(s["tokens"] > 0 and not s["errors"] for s in report["scenarios"])
    assert [f["threshold"] for f in report["floors"]] == [0.95, 0.95]
    assert report["owq_peak_rss_mib"] > 0
    assert "floor:" in done.stdout and "tok/s" in done.stdout
