"""Every error status of the API in OpenAI's shape, from a real server: 400 (bad parameters,
malformed JSON, context too long naming both lengths), 404, 405, 413, 429 (with Retry-After) and
503 (engine not ready). 401/403 are in test_server_tenancy.py, 409 in test_server_adapters.py.
Also: nothing a client sends disturbs another client's running stream.
"""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest
from engine_fixtures import tiny_tokenizer
from test_server_harness import (
    LiveServer,
    make_app,
    make_engine,
    metric,
    openai_error,
    tiny_assets,
)

from owq.server.app import create_app
from owq.server.settings import ServerSettings

MAX_BODY = 4096
MAX_CONTEXT = 256  # the tiny models' max_position_embeddings
PROMPT = "It is a truth"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("errors"), num_adapters=1)


@pytest.fixture(scope="module")
def server(assets):
    ckpt, adapters = assets
    settings = {"max_body_bytes": MAX_BODY, "retry_after_s": 2}
    with LiveServer(make_app(ckpt, adapters, settings=settings, max_batch=1, max_queue=1)) as s:
        s.wait_ready()
        yield s


def post(server, path: str, body) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=60)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": PROMPT, "temperature": 5}, "temperature"),
        ({"prompt": PROMPT, "top_p": 0}, "top_p"),
        ({"prompt": PROMPT, "n": 0}, "n"),
        ({"prompt": PROMPT, "n": 1000}, "n"),
        ({"prompt": PROMPT, "max_tokens": -1}, "max_tokens"),
        ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"prompt": PROMPT, "logprobs": 500}, "logprobs"),
        ({"prompt": PROMPT, "stop": [""]}, "stop"),
        ({"prompt": PROMPT, "seed": 2**64}, "seed"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [1, 2, 99999]}, "prompt"),
        ({"prompt": {"a": 1}}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_bad_completion_parameters_are_400(server, body, param):
    assert openai_error(post(server, "/completions", body), 400)["param"] == param


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 99, "logprobs": True},
    ],
)
def test_bad_chat_parameters_are_400(server, body):
    openai_error(post(server, "/chat/completions", body), 400)


def test_malformed_json_is_400(server):
    r = httpx.post(
        f"{server.base_url}/completions",
        content=b'{"prompt": ',
        headers={"content-type": "application/json"},
    )
    assert openai_error(r, 400)["code"] == "invalid_json"


def test_context_too_long_names_both_lengths(server):
    prompt = "ab " * 400
    n_prompt = len(tiny_tokenizer()(prompt).input_ids)
    err = openai_error(post(server, "/completions", {"prompt": prompt, "max_tokens": 4}), 400)
    assert err["code"] == "context_length_exceeded"
    numbers = {int(x) for x in re.findall(r"\d+", err["message"])}
    assert MAX_CONTEXT in numbers and (n_prompt in numbers or n_prompt + 4 in numbers), err


def test_unknown_model_route_and_method(server):
    assert openai_error(post(server, "/completions", {"prompt": "x", "model": "nope"}), 404)
    assert openai_error(httpx.get(f"{server.base_url}/nothing-here"), 404)
    assert openai_error(httpx.get(f"{server.base_url}/completions"), 405)


def test_body_too_large_is_413(server):
    big = {"prompt": "x" * (MAX_BODY + 10)}
    assert openai_error(post(server, "/completions", big), 413)["code"] == "request_too_large"
    chunked = httpx.post(
        f"{server.base_url}/completions",
        content=iter([json.dumps(big).encode()]),
        headers={"content-type": "application/json"},
    )
    openai_error(chunked, 413)  # no Content-Length: counted while reading


def test_queue_full_is_429_with_retry_after(server):
    results: list[httpx.Response] = []

    def one():
        body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 0}
        results.append(httpx.post(f"{server.base_url}/completions", json=body, timeout=120))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    full = [r for r in results if r.status_code == 429]
    assert full, [r.status_code for r in results]
    assert {r.status_code for r in results} <= {200, 429}
    err = openai_error(full[0], 429)
    assert err["type"] == "rate_limit_error" and full[0].headers["retry-after"] == "2"


def test_garbage_does_not_disturb_a_running_stream(server):
    want = httpx.post(
        f"{server.base_url}/completions",
        timeout=60,
        json={"prompt": PROMPT, "max_tokens": 40, "temperature": 0},
    ).json()["choices"][0]["text"]
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stream": True}
    text = ""
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as r:
        for i, line in enumerate(r.iter_lines()):
            if i == 1:
                for bad in (b"\xff\xfe", b"[1, 2", b'{"prompt": [1e999]}', b"null"):
                    httpx.post(
                        f"{server.base_url}/completions",
                        content=bad,
                        headers={"content-type": "application/json"},
                    )
                with httpx.stream(
                    "POST", f"{server.base_url}/completions", json={**body, "max_tokens": 100}
                ) as dropped:
                    next(dropped.iter_lines())  # a client that goes away mid-stream
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    assert text == want
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_not_ready_is_503(assets):
    engine = make_engine(*assets)  # never started: the engine is not ready
    app = create_app(engine, ServerSettings(start_engine=False))
    with LiveServer(app) as s:
        assert httpx.get(f"{s.url}/health").status_code == 200
        assert httpx.get(f"{s.url}/ready").status_code == 503
        r = httpx.post(f"{s.base_url}/completions", json={"prompt": PROMPT})
        assert openai_error(r, 503)["code"] == "not_ready"
        assert "retry-after" in r.headers


def test_a_client_that_leaves_frees_its_requests(assets):
    """A non-streamed request whose client disconnects is cancelled (counted as 499)."""
    with LiveServer(make_app(*assets, max_batch=1, max_queue=64)) as s:
        s.wait_ready()
        body = {"prompt": PROMPT, "max_tokens": 200, "n": 16, "temperature": 0}
        start = time.monotonic()
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{s.base_url}/completions", json=body, timeout=0.5)
        while metric(s.url, "owq_requests_total", status="499") < 1:
            assert time.monotonic() - start < 10, "the disconnect was not noticed"
            time.sleep(0.1)
        quick = httpx.post(f"{s.base_url}/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert quick.status_code == 200
        generated = metric(s.url, "owq_generation_tokens_total", adapter="ckpt")
        assert generated < 16 * 200 / 2  # most of the 16 x 200 tokens were never made
