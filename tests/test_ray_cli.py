"""`owq serve --ray` as a user runs it: the command starts its own local Ray instance, serves 2
replicas of the tiny checkpoint on the given port (here with round-robin routing, the
benchmark's baseline), and stops cleanly (exit 0) on SIGTERM."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest
from test_server_harness import tiny_assets

from owq.server.ray_env import LOCAL_PORTS, free_port

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="Ray Serve is not installed: pip install -e '.[ray]' (scripts/setup.sh does)",
)


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float = 240) -> None:
    """Until /ready says both replicas are (one answers before the other has started)."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        try:
            ready = httpx.get(f"{url}/ready", timeout=10)
            if ready.status_code == 200 and len(ready.headers["x-owq-replicas"].split(",")) == 2:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def replica_of_next(url: str) -> str:
    body = {"prompt": "It is", "max_tokens": 3, "model": "adapter-0"}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.headers["x-owq-replica"]


def test_owq_serve_ray_starts_its_cluster_serves_and_stops(tmp_path):
    ckpt, adapters = tiny_assets(tmp_path, num_adapters=2)
    port = free_port()
    flags = "--ray --ray-replicas 2 --ray-cpus-per-replica 0.5 --ray-routing round-robin"
    flags += f" --max-batch 2 --port {port}"
    cmd = [sys.executable, "-m", "owq", "serve", str(ckpt), "--adapters", str(adapters)]
    # its own Ray instance: its own free ports (not this process's, another instance's)
    env = {k: v for k, v in os.environ.items() if k not in LOCAL_PORTS}
    env |= {"PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [*cmd, *flags.split()], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url)
        for _ in range(4):  # the router(s) hear of both replicas by Ray's long poll
            replica_of_next(url)
        # round-robin, blind to the adapter (multiplexed routing would keep all of these on
        # one replica): each router turns through the replicas, and Ray may run two routers
        # here, so counts over 8 requests differ by at most one per router
        replicas = Counter(replica_of_next(url) for _ in range(8))
        assert len(replicas) == 2 and max(replicas.values()) <= 5, replicas
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "2 replicas of 0.5 CPU, round-robin routing" in out and "OPEN" in out, out[-3000:]
