"""The Ray router's own logic, without a cluster: which adapter a request names (its routing
key) and the merge of the replicas' Prometheus pages."""

from __future__ import annotations

import importlib.util
import json

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="Ray Serve is not installed: pip install -e '.[ray]' (scripts/setup.sh does)",
)

BASE = "default-owq3-k8"


def request(path="/v1/completions", method="POST", headers=(), body: dict | bytes = b""):
    from owq.server.ray_asgi import HttpRequest

    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    encoded = tuple((k.encode(), v.encode()) for k, v in headers)
    return HttpRequest(method, path, b"", encoded, raw)


@pytest.mark.parametrize(
    ("req", "adapter"),
    [
        (request(body={"model": "task-a", "prompt": "x"}), "task-a"),
        (request("/v1/chat/completions", body={"model": " task-a "}), "task-a"),
        (request(headers=[("X-OWQ-Adapter", "task-b")], body={"model": "task-a"}), "task-b"),
        (request(body={"model": BASE}), ""),  # the base spreads over all replicas
        (request(headers=[("x-owq-adapter", BASE)]), ""),
        (request(body={"prompt": "x"}), ""),
        (request(body={"model": "../etc/passwd"}), ""),  # not a name: the app answers 400/404
        (request(body={"model": 7}), ""),
        (request(body=b"{not json"), ""),
        (request(body=b"[1, 2]"), ""),
        (request("/v1/models", "GET", body={"model": "task-a"}), ""),
        (request("/v1/models", "GET", headers=[("X-OWQ-Adapter", "task-c")]), "task-c"),
    ],
)
def test_the_routing_key_is_the_adapter_the_app_would_use(req, adapter):
    from owq.server.ray_router import adapter_of

    assert adapter_of(req, BASE) == adapter


def page(requests: dict[str, float], ttft: list[float]) -> str:
    registry = CollectorRegistry()
    counter = Counter("owq_requests", "Requests", ["adapter"], registry=registry)
    for adapter, count in requests.items():
        counter.labels(adapter).inc(count)
    histogram = Histogram("owq_ttft_seconds", "TTFT", buckets=(0.1, 1.0), registry=registry)
    for value in ttft:
        histogram.observe(value)
    return generate_latest(registry).decode()


def test_merged_metrics_keep_every_replicas_samples_under_its_label():
    from owq.server.ray_router import merge_metrics

    pages = {"r1": page({"a": 2, "b": 1}, [0.05, 0.5]), "r2": page({"a": 5}, [2.0])}
    families = {f.name: f for f in text_string_to_metric_families(merge_metrics(pages).decode())}
    requests = {
        (s.labels["replica"], s.labels["adapter"]): s.value
        for s in families["owq_requests"].samples
        if s.name == "owq_requests_total"
    }
    assert requests == {("r1", "a"): 2, ("r1", "b"): 1, ("r2", "a"): 5}
    counts = {
        s.labels["replica"]: s.value
        for s in families["owq_ttft_seconds"].samples
        if s.name == "owq_ttft_seconds_count"
    }
    assert counts == {"r1": 2, "r2": 1}
    buckets = {
        (s.labels["replica"], s.labels["le"]): s.value
        for s in families["owq_ttft_seconds"].samples
        if s.name == "owq_ttft_seconds_bucket"
    }
    assert buckets[("r1", "0.1")] == 1 and buckets[("r1", "1.0")] == 2
    assert buckets[("r2", "1.0")] == 0 and buckets[("r2", "+Inf")] == 1
