"""`docker/build-local.sh` for real: build the CPU image, run it, ask it, and run the compose stack.

Needs a Docker daemon that already runs (it is skipped, saying so, where none answers, as in
CI). The container mounts the tiny checkpoint and its adapters read-only, so the adapter request
must answer here. The first run on a host makes the debootstrap base (minutes); later runs reuse
it and the layer cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from test_server_cli import free_port
from test_server_harness import tiny_assets

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docker" / "build-local.sh"


def docker_client() -> str | None:
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def daemon_problem() -> str | None:
    """Why the real build cannot run here, or None when a daemon answers."""
    client = docker_client()
    if client is None:
        return "no docker client installed"
    done = subprocess.run(
        [client, "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        return f"no Docker daemon answers ({lines[0] if lines else done.returncode})"
    return None


@pytest.fixture
def daemon():
    problem = daemon_problem()
    if problem:
        pytest.skip(f"the real Docker build needs a running daemon: {problem}")


def test_help_lists_steps_and_examples():
    done = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "examples:" in done.stdout
    bad = subprocess.run([str(SCRIPT), "bogus"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip() == (
        "build-local: error: unknown step 'bogus' (see --help)"
    )


@pytest.fixture
def readable_assets():
    """Tiny checkpoint + adapters in a dir any container user can read (tmp_path is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="owq-docker-test-"))
    root.chmod(0o755)
    try:
        yield tiny_assets(root, num_adapters=1)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_build_run_and_compose(daemon, readable_assets):
    ckpt, adapters = readable_assets
    env = {
        **os.environ,
        "OWQ_CHECKPOINT": str(ckpt),
        "OWQ_ADAPTERS": str(adapters),
        "OWQ_ADAPTER": "adapter-0",
        "OWQ_PORT": str(free_port()),
    }
    done = subprocess.run(
        [str(SCRIPT), "tools", "base", "build", "run", "compose"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "serving ckpt" in out  # the checkpoint's recorded name, not the mount's
    assert "adapter adapter-0: answered" in out
    assert "the CA secret is not in any layer" in out
    assert "Prometheus scraped owq: sum(owq_requests_total) = " in out
    size_gb = float(out.split("image owq:cpu: ", 1)[1].split(" GB", 1)[0])
    assert 0.5 < size_gb <= 2.0
