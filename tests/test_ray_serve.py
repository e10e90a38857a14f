"""`owq serve --ray` end to end: a real local Ray cluster started here, 2 engine replicas of the
tiny checkpoint behind HAProxy and the router, the real `openai` client and httpx.

Needs Ray Serve (`pip install -e '.[ray]'`; `scripts/setup.sh` installs it). The replica that
answered is the response's `X-OWQ-Replica` header; its metrics are the `replica` label of the
merged `/metrics`. The replica-kill test replaces one replica; the eviction test leaves a fifth
adapter loaded (4 fit on the 2 replicas: the earlier tests' placements assume that), and the
adapter-change test, last, loads and unloads one on both replicas behind Ray's back.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server_harness import openai_error, sse_events, tiny_assets

from owq.server.ray_env import free_port

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="Ray Serve is not installed: pip install -e '.[ray]' (scripts/setup.sh does)",
)

ADAPTERS = [f"adapter-{i}" for i in range(4)]  # 2 per replica; adapter-4 makes one evict
PROMPT = "It is a truth universally"
TIMEOUT_S = 120
LONG = 220  # tokens: the prompt and these fill the tiny model's 256-token context
LEARN_S = 1.0  # for Ray's router to hear which replica loaded an adapter


@dataclass(frozen=True)
class Cluster:
    url: str
    base: str  # the base model's public name


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray import serve

    from owq.server.ray_serve import APP_NAME, build_app

    ckpt, adapters = tiny_assets(tmp_path_factory.mktemp("ray"), num_adapters=len(ADAPTERS) + 1)
    flags = [ckpt, "--adapters", adapters, "--max-batch", "4", "--ray-replicas", "2"]
    flags += ["--ray-max-adapters-per-replica", "2"]
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
        log_to_driver=False,
    )  # fmt: skip
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"argv": flags}), name=APP_NAME, route_prefix="/")
        yield Cluster(f"http://127.0.0.1:{port}", ckpt.name)
        serve.shutdown()
    finally:
        ray.shutdown()


def complete(cluster: Cluster, model: str | None = None, headers=None, **body) -> httpx.Response:
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0.0, **body}
    if model is not None:
        body["model"] = model
    url = f"{cluster.url}/v1/completions"
    return httpx.post(url, json=body, headers=headers or {}, timeout=TIMEOUT_S)


def replica_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers["x-owq-replica"]


def samples(cluster: Cluster, name: str) -> list:
    response = httpx.get(f"{cluster.url}/metrics", timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    families = text_string_to_metric_families(response.text)
    return [s for f in families for s in f.samples if s.name == name]


def homes(cluster: Cluster) -> dict[str, str]:
    """adapter -> the replica its requests go to: after the first request has loaded it and
    Ray's router has heard so (the replica pushes its ids every 0.1 s), it must not move."""
    found = {}
    for name in ADAPTERS:  # one at a time: a burst of new adapters before Ray's router has
        found[name] = replica_of(complete(cluster, name))  # heard may crowd one replica
        time.sleep(LEARN_S)
    for name, first in found.items():
        again = [replica_of(complete(cluster, name)) for _ in range(3)]
        assert again == [first] * 3, (name, first, again)
    return found


def test_two_replicas_answer_the_openai_client(cluster):
    import openai

    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)

    def ask(i: int) -> str:
        raw = client.completions.with_raw_response.create(
            model=cluster.base, prompt=PROMPT, max_tokens=24, temperature=0.8, seed=i
        )
        assert raw.parse().choices[0].text
        return raw.headers["x-owq-replica"]

    with ThreadPoolExecutor(8) as pool:
        replicas = set(pool.map(ask, range(16)))
    assert len(replicas) == 2, replicas
    ready = httpx.get(f"{cluster.url}/ready", timeout=TIMEOUT_S)
    assert ready.json()["status"] == "ready"
    assert set(ready.headers["x-owq-replicas"].split(",")) == replicas
    chat = client.chat.completions.create(
        model=ADAPTERS[1], messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert chat.model == ADAPTERS[1] and chat.choices[0].message.content is not None


def request_counts(cluster: Cluster) -> dict[tuple[str, str], float]:
    """(adapter, replica) -> requests that replica has answered for that adapter."""
    counts: dict[tuple[str, str], float] = {}
    for s in samples(cluster, "owq_requests_total"):
        key = (s.labels["adapter"], s.labels["replica"])
        counts[key] = counts.get(key, 0) + s.value
    return counts


def test_requests_for_an_adapter_land_on_the_replica_that_loaded_it(cluster):
    home = homes(cluster)
    assert len(set(home.values())) == 2, home  # Ray puts a new adapter on the emptier replica
    before = request_counts(cluster)  # an adapter an earlier test used may have had another home
    for name, replica in home.items():
        by_header = complete(cluster, headers={"X-OWQ-Adapter": name})
        assert by_header.json()["model"] == name
        assert replica_of(by_header) == replica
        with httpx.stream(
            "POST", f"{cluster.url}/v1/completions", timeout=TIMEOUT_S,
            json={"prompt": PROMPT, "max_tokens": 4, "model": name, "stream": True},
        ) as streamed:  # fmt: skip
            assert replica_of(streamed) == replica
            assert [e["model"] for e in sse_events(streamed)][0] == name
    after = request_counts(cluster)  # counted by the replica that served them, only
    for name, replica in home.items():
        grew = {r: n - before.get((a, r), 0) for (a, r), n in after.items() if a == name}
        assert {r: n for r, n in grew.items() if n} == {replica: 2}, (name, replica, grew)


def test_errors_are_the_apps_own(cluster):
    err = openai_error(complete(cluster, "no-such-adapter"), 404)
    assert err["code"] == "model_not_found"
    err = openai_error(complete(cluster, prompt=""), 400)
    assert err["param"] == "prompt"
    too_big = httpx.post(
        f"{cluster.url}/v1/completions", content=b"x" * (2 << 20), timeout=TIMEOUT_S,
        headers={"content-type": "application/json"},
    )  # fmt: skip
    openai_error(too_big, 413)


def test_metrics_of_both_replicas_are_scraped(cluster):
    homes(cluster)  # traffic on both replicas
    response = httpx.get(f"{cluster.url}/metrics", timeout=TIMEOUT_S)
    replicas = set(response.headers["x-owq-replicas"].split(","))
    assert len(replicas) == 2
    for name in ("owq_requests_total", "owq_generation_tokens_total", "owq_adapters_loaded"):
        labelled = {s.labels["replica"] for s in samples(cluster, name)}
        assert labelled == replicas, (name, labelled)


def token_counts(cluster: Cluster, adapter: str) -> dict[str, float]:
    """replica -> tokens streamed for `adapter` (the inter-token gaps observed, + 1 each)."""
    gaps = samples(cluster, "owq_inter_token_latency_seconds_count")
    return {s.labels["replica"]: s.value for s in gaps if s.labels["adapter"] == adapter}


def test_a_client_leaving_cancels_its_request_on_the_replica(cluster):
    adapter, max_tokens = ADAPTERS[2], 200
    before = token_counts(cluster, adapter)
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "model": adapter, "stream": True}
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=TIMEOUT_S) as r:
        replica = replica_of(r)
        assert next(line for line in r.iter_lines() if line.startswith("data:"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        running = samples(cluster, "owq_running_batch_size")
        if all(s.value == 0 for s in running if s.labels["replica"] == replica):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"replica {replica} still runs the abandoned request: {running}")
    streamed = token_counts(cluster, adapter)[replica] - before.get(replica, 0)
    assert streamed < max_tokens // 2, streamed  # stopped, not run to its end
    assert complete(cluster, adapter).status_code == 200


def kill_replica(replica: str) -> None:
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if actor["namespace"] == "serve" and "EngineReplica" in name and name.endswith(replica):
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            return
    raise AssertionError(f"no actor for replica {replica}")


def long_request(cluster: Cluster, model: str, seed: int) -> httpx.Response:
    return complete(cluster, model, max_tokens=LONG, temperature=1.0, seed=seed, ignore_eos=True)


def steady_client(cluster: Cluster, model: str, count: int) -> list[int]:
    statuses = []
    for _ in range(count):
        statuses.append(complete(cluster, model, max_tokens=8).status_code)
        time.sleep(0.1)
    return statuses


def wait_queued(cluster: Cluster, replica: str, timeout_s: float = 30) -> None:
    """Until `replica`'s engine reports requests waiting for a row."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        depth = {s.labels["replica"]: s.value for s in samples(cluster, "owq_queue_depth")}
        if depth.get(replica, 0) >= 1:
            return
        time.sleep(0.02)
    raise AssertionError(f"replica {replica} never queued a request: {depth}")


def tail_of(stream) -> list[str]:
    """The rest of a stream's lines; a stream whose replica died ends where it was cut."""
    lines = []
    with contextlib.suppress(httpx.RemoteProtocolError, httpx.ReadError):
        lines.extend(stream)
    return lines


def test_killing_a_replica_loses_only_its_requests_in_flight(cluster):
    """The victim runs 4 streams (its whole batch) with 8 plain requests queued behind them
    (two more batches' worth) when its actor is killed; meanwhile a client of the other
    replica keeps going. The streams the victim had started are cut; the requests it had not
    answered yet HAProxy sends to the other replica (`ray_env.py`): every one is answered
    there, and nothing else fails."""
    import openai

    home = homes(cluster)
    victim_adapter = ADAPTERS[0]
    victim = home[victim_adapter]
    survivor_adapter = next(a for a, r in home.items() if r != victim)
    # every stream runs its LONG tokens: none may end early at an EOS before the kill
    body = {"prompt": PROMPT, "max_tokens": LONG, "model": victim_adapter, "stream": True,
            "ignore_eos": True}  # fmt: skip
    url = f"{cluster.url}/v1/completions"
    with ThreadPoolExecutor(10) as pool, contextlib.ExitStack() as streams:
        steady = pool.submit(steady_client, cluster, survivor_adapter, 10)
        running = [streams.enter_context(httpx.stream("POST", url, json=body)) for _ in range(4)]
        assert {replica_of(r) for r in running} == {victim}
        lines = [r.iter_lines() for r in running]
        for stream in lines:
            assert next(line for line in stream if line.startswith("data:"))  # running
        queued = [pool.submit(long_request, cluster, victim_adapter, i) for i in range(8)]
        wait_queued(cluster, victim)
        kill_replica(victim)
        tails = [tail_of(stream) for stream in lines]
        answers = [f.result() for f in queued]
        assert steady.result() == [200] * 10  # the other replica lost nothing
    assert any("data: [DONE]" not in t for t in tails), "every stream ended before the kill"
    moved = [replica_of(a) for a in answers if replica_of(a) != victim]
    assert moved, "every queued request finished before the kill"  # one was still queued
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    again = client.completions.with_raw_response.create(
        model=victim_adapter, prompt=PROMPT, max_tokens=4
    )
    assert again.headers["x-owq-replica"] != victim
    replaced = ready_replicas(cluster, 2)  # Ray starts a new replica in the killed one's place
    assert victim not in replaced and set(moved) <= replaced


def ready_replicas(cluster: Cluster, count: int, timeout_s: float = 120) -> set[str]:
    """The ready replicas, once there are `count` of them."""
    deadline = time.monotonic() + timeout_s
    while True:
        ready = httpx.get(f"{cluster.url}/ready", timeout=TIMEOUT_S)
        replicas = set(filter(None, ready.headers.get("x-owq-replicas", "").split(",")))
        if len(replicas) >= count:
            return replicas
        assert time.monotonic() < deadline, f"{len(replicas)} ready replicas: {ready.text}"
        time.sleep(0.5)


def test_ray_evicting_an_adapter_unloads_it_from_the_replica(cluster):
    home = homes(cluster)  # 2 adapters on each replica: both full
    extra = replica_of(complete(cluster, "adapter-4"))
    loaded = {s.labels["replica"]: s.value for s in samples(cluster, "owq_adapters_loaded")}
    assert loaded == {r: 2.0 for r in set(home.values())}, loaded  # not 3 on `extra`
    evicted = [a for a, r in home.items() if r == extra]
    again = complete(cluster, evicted[0])  # its replica loads it again, or the other one does
    assert again.status_code == 200


def test_adapter_changes_reach_every_replica(cluster):
    """`POST`/`DELETE /v1/adapters` go to every replica: a delete that any replica refuses
    (it does not hold the adapter) answers that refusal, so a delete answered 200 after the
    load shows that the load reached both."""
    url, replicas = f"{cluster.url}/v1/adapters", ready_replicas(cluster, 2)
    loaded = httpx.post(url, json={"name": ADAPTERS[3]}, timeout=TIMEOUT_S)
    assert loaded.status_code == 200, loaded.text
    assert set(loaded.headers["x-owq-replicas"].split(",")) == replicas
    deleted = httpx.delete(f"{url}/{ADAPTERS[3]}", timeout=TIMEOUT_S)
    assert deleted.status_code == 200, deleted.text
    assert set(deleted.headers["x-owq-replicas"].split(",")) == replicas
    openai_error(httpx.delete(f"{url}/{ADAPTERS[3]}", timeout=TIMEOUT_S), 404)  # gone from all
