"""End-to-end adapter management on a real server: hot load during a running stream, unload with
requests in flight (a later request loads it again on demand), fingerprint mismatch (409),
path-like names and symlinks out of the dir (400).
"""

from __future__ import annotations

import re
import shutil

import httpx
import pytest
from engine_fixtures import write_foreign_adapter
from test_server_harness import LiveServer, make_app, openai_error, tiny_assets

PROMPT = "It is a truth"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("adapters"), num_adapters=3)


@pytest.fixture(scope="module")
def server(assets):
    ckpt, adapters = assets
    app = make_app(ckpt, adapters, settings={"preload_adapters": False}, max_batch=4)
    with LiveServer(app) as s:
        s.wait_ready()
        yield s


def load(server, name: str) -> httpx.Response:
    return httpx.post(f"{server.base_url}/adapters", json={"name": name}, timeout=60)


def greedy(server, max_tokens: int, **extra) -> str:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, **extra}
    r = httpx.post(f"{server.base_url}/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def stream_text(lines) -> str:
    import json

    text = ""
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            text += json.loads(line[6:])["choices"][0]["text"]
    return text


def open_stream(client: httpx.Client, server, max_tokens: int, **extra):
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True, **extra}
    return client.stream("POST", f"{server.base_url}/completions", json=body)


def test_list_shows_available_adapters(server):
    data = httpx.get(f"{server.base_url}/adapters").json()["data"]
    assert {"adapter-0", "adapter-1", "adapter-2"} <= {a["name"] for a in data}


def test_hot_load_during_a_running_stream(server):
    want = greedy(server, 200)
    with httpx.Client(timeout=60) as client, open_stream(client, server, 200) as r:
        lines = r.iter_lines()
        first = [next(lines) for _ in range(2)]  # the stream is running (an event, a blank)
        loaded = load(server, "adapter-0")
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["name"] == "adapter-0" and loaded.json()["loaded"] is True
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert stream_text(first + rest) == want  # the running request did not notice
    assert greedy(server, 8, model="adapter-0") != ""  # the new adapter serves at once
    models = [m["id"] for m in httpx.get(f"{server.base_url}/models").json()["data"]]
    assert "adapter-0" in models


def test_unload_with_requests_in_flight(server):
    assert load(server, "adapter-1").status_code == 200
    want = greedy(server, 48, model="adapter-1")
    with (
        httpx.Client(timeout=60) as client,
        open_stream(client, server, 48, model="adapter-1") as r,
    ):
        lines = r.iter_lines()
        first = [next(lines) for _ in range(2)]
        gone = httpx.delete(f"{server.base_url}/adapters/adapter-1", timeout=60)
        assert gone.status_code == 200, gone.text
        rest = [line for line in lines if line]
    assert stream_text(first + rest) == want  # in-flight requests keep their weights
    err = openai_error(httpx.delete(f"{server.base_url}/adapters/adapter-1"), 404)
    assert "adapter-1" in err["message"]
    assert greedy(server, 48, model="adapter-1") == want  # loaded again on demand


def test_reload_replaces_weights_and_keeps_serving(server):
    assert load(server, "adapter-2").status_code == 200
    first = greedy(server, 12, model="adapter-2")
    assert load(server, "adapter-2").status_code == 200
    assert greedy(server, 12, model="adapter-2") == first


def test_fingerprint_mismatch_is_409_naming_both(server, assets):
    write_foreign_adapter(assets[1], "foreign")
    err = openai_error(load(server, "foreign"), 409)
    assert len(set(re.findall(r"\b[0-9a-f]{16}\b", err["message"]))) == 2, err["message"]
    assert err["code"] == "adapter_fingerprint_mismatch"


@pytest.mark.parametrize("name", ["../x", "/etc", "a/b", "..", "../adapters/adapter-0", "~root"])
def test_path_like_names_are_refused(server, name):
    err = openai_error(load(server, name), 400)
    assert err["param"] == "name"


def test_empty_name_is_refused(server):
    openai_error(load(server, ""), 400)


def test_symlink_out_of_the_dir_is_refused(server, assets, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(assets[1] / "adapter-2", outside)
    (assets[1] / "escape").symlink_to(outside, target_is_directory=True)
    try:
        err = openai_error(load(server, "escape"), 400)
        assert "escape" in err["message"]
    finally:
        (assets[1] / "escape").unlink()


def test_unknown_adapter_is_404(server):
    assert openai_error(load(server, "no-such-adapter"), 404)["code"] == "adapter_not_found"
