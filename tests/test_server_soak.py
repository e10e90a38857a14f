"""The soak test (`benchmarks/soak.py`) for 60 seconds on a tiny checkpoint: `owq serve` as its
own process, clients streaming and not, cancelling, adapters replaced and unloaded under them;
every floor of the full run must hold (nothing lost, hung or 5xx, /metrics equal to what the
clients saw, the batch back to 0, RSS within 10%, probes on one version each)."""

from __future__ import annotations

import json

import soak
from engine_fixtures import build_tiny_server_assets


def test_a_minute_of_soak_on_a_tiny_checkpoint(tmp_path):
    ckpt, _ = build_tiny_server_assets(tmp_path, "llama", 0)
    out = tmp_path / "soak.json"
    argv = ["--ckpt", str(ckpt), "--clients", "8", "--minutes", "1", "--adapters", "4"]
    argv += ["--warmup-s", "10", "--admin-every-s", "2", "--deadline-s", "120", "--out", str(out)]
    argv += ["--server-threads", "1"]  # OpenMP threads spin when a shared machine is oversubscribed
    status = soak.main(argv)
    result = json.loads(out.read_text())
    assert result["floors"] == dict.fromkeys(result["floors"], True), result
    assert status == 0
    tally = result["tally"]
    assert tally["complete"] > 20 and tally["probes"] > 5
    assert sum(result["admin"].values()) >= 15  # the admin client really churned adapters
