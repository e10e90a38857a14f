"""Every metric the Grafana board and the Prometheus config use is one the running app exports.

The real app (real engine on the tiny checkpoint, real uvicorn, real HTTP) serves a request on
the base and one on an adapter; its `/metrics` page, scraped like Prometheus does, must hold
every series the board's queries name, with the labels they group by. The board's datasource
must be the provisioned one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_server_harness import LiveServer, make_app, tiny_assets

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "docker" / "grafana"
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "le", "adapter", "status"}


def board() -> dict:
    return json.loads((GRAFANA / "dashboards" / "owq.json").read_text())


def queries() -> list[str]:
    return [t["expr"] for panel in board()["panels"] for t in panel["targets"]]


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression (identifiers that are not functions or labels)."""
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", re.sub(r"\[[^\]]*\]", "", expr)))
    return words - PROMQL_WORDS - grouping_labels(expr)


def grouping_labels(expr: str) -> set[str]:
    return {x.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for x in group.split(",")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, set[str]]:
    """{sample name: label names} of the live app's /metrics after two requests."""
    ckpt, adapters = tiny_assets(tmp_path_factory.mktemp("metrics"), num_adapters=1)
    scrape = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())["scrape_configs"][0]
    with LiveServer(make_app(ckpt, adapters)) as server:
        server.wait_ready()
        for model in (None, "adapter-0"):
            body = {"prompt": "It is a truth", "max_tokens": 4, "temperature": 0}
            if model:
                body["model"] = model
            reply = httpx.post(f"{server.base_url}/completions", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
        page = httpx.get(server.url + scrape["metrics_path"])
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(page.text):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


def test_board_covers_what_the_issue_asks_for():
    used = set().union(*(metric_names(q) for q in queries()))
    assert {
        "owq_generation_tokens_total",
        "owq_time_to_first_token_seconds_bucket",
        "owq_inter_token_latency_seconds_bucket",
        "owq_queue_depth",
        "owq_running_batch_size",
        "owq_adapter_load_seconds_count",
    } <= used


@pytest.mark.parametrize("expr", queries())
def test_every_series_of_the_board_is_exported(exported, expr):
    names = metric_names(expr)
    assert names and names <= set(exported), names - set(exported)
    for name in names:
        assert grouping_labels(expr) - {"le"} <= exported[name], (name, exported[name])


def test_prometheus_config_scrapes_a_route_that_exports(exported):
    assert "owq_requests_total" in exported and "owq_queue_depth" in exported


def test_board_uses_the_provisioned_datasource():
    sources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = sources["datasources"][0]["uid"]
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    panels = board()["panels"]
    assert panels and all(p["datasource"]["uid"] == uid for p in panels)
    assert all(t["datasource"]["uid"] == uid for p in panels for t in p["targets"])
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "owq.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_the_keys_variant_scrapes_with_its_metrics_key(tmp_path):
    """With api keys the server's /metrics needs a key: the Prometheus config of
    docker/compose.keys.yml sends the one in its secret file, and that key opens the page."""
    keys = {"keys": {"sk-ops": {"admin": True}, "sk-scrape": {"metrics": True, "base": False}}}
    config = yaml.safe_load((ROOT / "docker" / "prometheus.keys.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["authorization"]["credentials_file"] == "/run/secrets/owq_metrics_key"
    ckpt, adapters = tiny_assets(tmp_path, num_adapters=0)
    with LiveServer(make_app(ckpt, adapters, keys=keys)) as server:
        server.wait_ready()
        url = server.url + job["metrics_path"]
        assert httpx.get(url).status_code == 401
        page = httpx.get(url, headers={"authorization": "Bearer sk-scrape"})
    assert page.status_code == 200 and "owq_requests_total" in page.text
