"""End to end, one client cannot hurt another: parameters that cannot be sampled, lone
surrogates and more choices than the queue holds are clean 400s; a request whose logits turn
non-finite gets its own 500 (streamed: an error event) while another tenant's stream and a
concurrent request finish with the text they get alone; a client's long strings are never
echoed in full. The fault is real: NaN in the runtime's rotary table at one position."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from test_server_harness import LiveServer, make_app, openai_error, sse_events, tiny_assets

PROMPT = "It is a truth universally acknowledged"
POISONED = 60  # rotary position made NaN: only a request that reaches it reads it
MAX_QUEUE = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt, adapters = tiny_assets(tmp_path_factory.mktemp("isolation"), num_adapters=1)
    app = make_app(ckpt, adapters, max_batch=4, max_queue=MAX_QUEUE)
    with LiveServer(app) as s:
        s.wait_ready()
        yield s


def post(server, path: str, body=None, content: bytes | None = None, **kw) -> httpx.Response:
    if content is not None:
        kw["headers"] = {"content-type": "application/json", **kw.get("headers", {})}
        return httpx.post(f"{server.base_url}{path}", content=content, timeout=60, **kw)
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=60, **kw)


@pytest.mark.parametrize("temperature", [1e-300, 1e-38, 0.001])
def test_a_temperature_that_cannot_be_sampled_is_400(server, temperature):
    r = post(server, "/completions", {"prompt": PROMPT, "temperature": temperature})
    assert openai_error(r, 400)["param"] == "temperature"


@pytest.mark.parametrize(
    "path, raw, param",  # fmt: skip
    [
        ("/completions", b'{"prompt": "a \\ud800 b"}', "prompt"),
        ("/completions", b'{"prompt": ["ok", "\\udfff"]}', "prompt"),
        ("/completions", b'{"prompt": "ok", "stop": ["\\ud800"]}', "stop"),
        (
            "/chat/completions",
            b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
            "messages",
        ),
    ],
)
def test_a_lone_surrogate_is_400(server, path, raw, param):
    err = openai_error(post(server, path, content=raw), 400)
    assert err["param"].startswith(param) and "surrogate" in err["message"]


def test_more_choices_than_the_queue_holds_is_400_naming_the_limit(server):
    body = {"prompt": [PROMPT] * 3, "n": 2, "max_tokens": 2}  # 6 choices, the queue holds 4
    err = openai_error(post(server, "/completions", body), 400)
    assert err["code"] == "too_many_choices"
    assert "6" in err["message"] and str(MAX_QUEUE) in err["message"]
    assert "--max-queue" in err["message"]


def poison(server) -> callable:
    cos = server.app.state.ctx.engine.runtime.cos
    saved = cos[POISONED].clone()
    cos[POISONED] = float("nan")
    return lambda: cos[POISONED].copy_(saved)


def test_non_finite_logits_fail_that_request_alone(server):
    short = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}  # ends before POISONED
    long = {"prompt": PROMPT, "max_tokens": POISONED, "temperature": 0.7, "seed": 1}
    alone = post(server, "/completions", short).json()["choices"][0]["text"]
    restore = poison(server)
    results: dict = {}

    def run(name, body, stream=False):
        if stream:
            with httpx.stream(
                "POST", f"{server.base_url}/completions", json={**body, "stream": True}
            ) as r:
                results[name] = sse_events(r)
        else:
            results[name] = post(server, "/completions", body)

    jobs = [
        ("victim", {**long, "logprobs": 2}, False),  # NaN logprobs would be a JSON error
        ("victim_stream", long, True),
        ("tenant_stream", short, True),
        ("tenant", short, False),
    ]
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    restore()
    err = openai_error(results["victim"], 500)
    assert err["code"] == "generation_failed" and "non-finite" in err["message"]
    assert results["victim_stream"][-1]["error"]["code"] == "generation_failed"
    streamed = "".join(e["choices"][0]["text"] for e in results["tenant_stream"] if e["choices"])
    assert streamed == alone
    assert results["tenant"].json()["choices"][0]["text"] == alone
    again = post(server, "/completions", {**long, "max_tokens": 4})
    assert again.status_code == 200  # the server goes on


def test_long_client_strings_are_not_echoed_in_full(server):
    name = "x" * 10_000
    for r in (
        post(server, "/completions", {"prompt": PROMPT, "model": name}),
        post(server, "/completions", {"prompt": PROMPT}, headers={"X-OWQ-Adapter": name}),
        httpx.delete(f"{server.base_url}/adapters/{name}"),
        post(server, "/adapters", {"name": name}),
        httpx.get(f"{server.base_url}/models/{name}"),
    ):
        assert 400 <= r.status_code < 500, r.text[:200]
        assert len(json.dumps(r.json())) < 500, r.text[:200]
