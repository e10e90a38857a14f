"""Prometheus metrics of one app: its own `CollectorRegistry`, fed by the routes and the engine.

`ServerMetrics` implements the protocol's `EngineObserver` (`on_step`, `on_adapters`) so the
engine can push queue depth, running batch size and adapter loads; the routes record requests,
tokens and latencies. Label values are the base name, a loaded adapter's name or "-" (never a
raw client string, so clients cannot grow the label set).
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
UNKNOWN = "-"


class ServerMetrics:
    def __init__(self, prefix: str = "owq"):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{prefix}_requests",
            "Requests by adapter and HTTP status",
            ["adapter", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{prefix}_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r
        )
        self.generated_tokens = Counter(
            f"{prefix}_generation_tokens", "Tokens generated", ["adapter"], registry=r
        )
        self.ttft = Histogram(
            f"{prefix}_time_to_first_token_seconds",
            "Time to first token",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{prefix}_inter_token_latency_seconds",
            "Time between generated tokens",
            ["adapter"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{prefix}_e2e_request_latency_seconds",
            "Request latency, arrival to last byte",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step = Histogram(
            f"{prefix}_step_seconds",
            "One model step: phase prefill (prompts) or decode (a token a row, sampling "
            "included); adapters: how many distinct adapters its rows were on (0, 1, 2+)",
            ["phase", "adapters"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(f"{prefix}_queue_depth", "Requests waiting", registry=r)
        self.running = Gauge(f"{prefix}_running_batch_size", "Rows in the batch", registry=r)
        self.adapters_loaded = Gauge(f"{prefix}_adapters_loaded", "Adapters loaded", registry=r)
        self.adapter_load = Histogram(
            f"{prefix}_adapter_load_seconds",
            "Adapter load time",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    # EngineObserver ---------------------------------------------------------------------------
    def on_step(self, running: int, queued: int) -> None:
        self.running.set(running)
        self.queue_depth.set(queued)

    def on_phase(self, phase: str, adapters: str, seconds: float) -> None:
        self.step.labels(phase, adapters).observe(seconds)

    def on_adapters(self, loaded: int, load_seconds: float | None) -> None:
        self.adapters_loaded.set(loaded)
        if load_seconds is not None:
            self.adapter_load.observe(load_seconds)

    # exposition -------------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Per-choice timing: TTFT at the first token, inter-token gaps after it."""

    def __init__(self, metrics: ServerMetrics, label: str, start: float | None = None):
        self.metrics, self.label = metrics, label
        self.start = start if start is not None else time.perf_counter()
        self.last: float | None = None
        self.tokens = 0

    def token(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.labels(self.label).observe(now - self.start)
        else:
            self.metrics.itl.labels(self.label).observe(now - self.last)
        self.last = now
        self.tokens += 1
