"""Helpers of the end-to-end server tests (no tests here): a real uvicorn server in a thread.

`LiveServer(app)` runs `uvicorn.Server` on a socket bound to a free port in a background thread
and waits until it has started; `openai_error` checks OpenAI's error shape; `metric` reads one
sample from a Prometheus text page. The engine is the real one, built on the tiny checkpoint
and adapters of `engine_fixtures.build_tiny_server_assets`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from engine_fixtures import build_tiny_server_assets
from prometheus_client.parser import text_string_to_metric_families

from owq.server.app import create_app
from owq.server.auth import KeyTable
from owq.server.engine import Engine, EngineConfig
from owq.server.metrics import ServerMetrics
from owq.server.settings import ServerSettings

START_TIMEOUT_S = 120


class LiveServer:
    """`with LiveServer(app) as s:` -> `s.url` (root) and `s.base_url` (…/v1)."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        self.url, self.base_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/v1"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while httpx.get(f"{self.url}/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("engine did not become ready")
            time.sleep(0.05)


def tiny_assets(tmp_path: Path, num_adapters: int = 3) -> tuple[Path, Path]:
    return build_tiny_server_assets(tmp_path, kind="llama", num_adapters=num_adapters)


def make_engine(ckpt: Path, adapters: Path, observer=None, **kwargs):
    config = EngineConfig(device="cpu", **kwargs)
    return Engine.from_checkpoint(ckpt, config, adapters_dir=adapters, observer=observer)


def make_app(
    ckpt: Path,
    adapters: Path,
    keys: dict | None = None,
    settings: dict | None = None,
    **engine_kwargs,
):
    """An app on a real engine; `keys` is an api-keys table ({"keys": {...}}) or None (open)."""
    table = None
    if keys is not None:
        path = adapters.parent / "keys.json"
        path.write_text(json.dumps(keys))
        table = KeyTable.from_file(path)
    options = {"preload_adapters": True, **(settings or {})}
    metrics = ServerMetrics()
    engine = make_engine(ckpt, adapters, observer=metrics, **engine_kwargs)
    return create_app(engine, ServerSettings(keys=table, **options), metrics)


def openai_error(response: httpx.Response, status: int) -> dict:
    """Assert `status` and OpenAI's error shape; return the inner error object."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return err


def metric(url: str, name: str, **labels) -> float:
    """The value of sample `name` with `labels` on `url`/metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def sse_events(response: httpx.Response) -> list:
    """Parsed `data:` events of a streamed response; the last must be [DONE]."""
    events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data:")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]
