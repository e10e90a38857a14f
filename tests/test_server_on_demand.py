"""Adapters on demand, end to end: a request naming an adapter of `--adapters DIR` that is not
loaded loads it (two concurrent first requests load it once); `--max-loaded-adapters 1` evicts
the idle one, and a request in flight keeps its version when its adapter is evicted and the
files replaced; `/v1/models` lists loaded and loadable adapters, `client.models.retrieve` works
for both and the base; a refused adapter says why and how to fix it, in `/v1/adapters` and to
the client (409); requests without max_tokens get the server's bounded default."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from engine_fixtures import random_adapter, write_foreign_adapter
from test_server_harness import LiveServer, make_app, metric, openai_error, tiny_assets

from owq.kernels.adapters import save_adapter
from owq.kernels.checkpoint import load_checkpoint

PROMPT = "It is a truth universally acknowledged"
DEFAULT_MAX_TOKENS = 5


def serve(tmp_path, **engine):
    ckpt, adapters = tiny_assets(tmp_path, num_adapters=3)
    settings = {"preload_adapters": False, "default_max_tokens": DEFAULT_MAX_TOKENS}
    return ckpt, adapters, LiveServer(make_app(ckpt, adapters, settings=settings, **engine))


def greedy(server, model: str | None, max_tokens: int = 8) -> str:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(f"{server.base_url}/completions", json={**body, "model": model}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def states(server) -> dict[str, str]:
    data = httpx.get(f"{server.base_url}/adapters").json()["data"]
    return {a["name"]: a["status"] for a in data}


def loads(server) -> float:
    return metric(server.url, "owq_adapter_load_seconds_count")


def test_unloaded_adapters_load_on_the_first_request_once(tmp_path):
    _, _, live = serve(tmp_path)
    with live as s:
        s.wait_ready()
        assert states(s) == dict.fromkeys(("adapter-0", "adapter-1", "adapter-2"), "loadable")
        texts: list[str] = []
        threads = [
            threading.Thread(target=lambda: texts.append(greedy(s, "adapter-1"))) for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(texts) == 2 and texts[0] == texts[1]
        assert loads(s) == 1
        assert states(s)["adapter-1"] == "loaded"
        by_header = httpx.post(
            f"{s.base_url}/completions",
            json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0},
            headers={"X-OWQ-Adapter": "adapter-2"},
            timeout=60,
        )
        assert by_header.status_code == 200 and loads(s) == 2
        assert texts[0] != greedy(s, None)


def test_max_loaded_one_evicts_and_in_flight_requests_keep_their_version(tmp_path):
    ckpt, adapters, live = serve(tmp_path, max_loaded_adapters=1, max_batch=4)
    with live as s:
        s.wait_ready()
        greedy(s, "adapter-0")
        want = greedy(s, "adapter-1", 120)  # evicts adapter-0 (idle)
        assert states(s) == {
            "adapter-0": "loadable",
            "adapter-1": "loaded",
            "adapter-2": "loadable",
        }
        body = {"prompt": PROMPT, "max_tokens": 120, "temperature": 0, "model": "adapter-1"}
        text = ""
        with httpx.stream("POST", f"{s.base_url}/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            first = [next(lines) for _ in range(2)]  # running on adapter-1's loaded version
            replaced = random_adapter(load_checkpoint(ckpt), "adapter-1", seed=999)
            save_adapter(replaced, adapters / "adapter-1", overwrite=True)
            greedy(s, "adapter-0")  # evicts adapter-1 while its request runs
            assert states(s)["adapter-1"] == "loadable"
            for line in first + list(lines):
                if line.startswith("data: {"):
                    text += __import__("json").loads(line[6:])["choices"][0]["text"]
        assert text == want
        assert greedy(s, "adapter-1", 120) != want  # the next request loads the new files


def test_models_list_retrieve_and_refusals(tmp_path):
    _, adapters, live = serve(tmp_path)
    write_foreign_adapter(adapters, "foreign")
    with live as s:
        s.wait_ready()
        client = openai.OpenAI(base_url=s.base_url, api_key="open", max_retries=0, timeout=60)
        greedy(s, "adapter-0")
        cards = {m.id: m for m in client.models.list().data}
        base = next(iter(cards))
        assert "foreign" not in cards
        assert cards["adapter-0"].status == "loaded" and cards["adapter-1"].status == "loadable"
        assert client.models.retrieve(base).id == base
        assert client.models.retrieve("adapter-1").parent == base
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("no-such-model")
        refused = next(a for a in httpx.get(f"{s.base_url}/adapters").json()["data"]
                       if a["name"] == "foreign")  # fmt: skip
        assert refused["status"] == "refused" and "tuned on base" in refused["error"]
        assert "--weak-columns-from" in refused["error"]
        r = httpx.post(f"{s.base_url}/completions", json={"prompt": PROMPT, "model": "foreign"})
        err = openai_error(r, 409)
        assert "this base is" in err["message"] and "re-tune" in err["message"]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="missing", prompt=PROMPT, max_tokens=2)


def test_requests_without_max_tokens_get_the_bounded_default(tmp_path):
    _, _, live = serve(tmp_path)
    with live as s:
        s.wait_ready()
        client = openai.OpenAI(base_url=s.base_url, api_key="open", max_retries=0, timeout=60)
        plain = client.completions.create(model=None, prompt=PROMPT, temperature=0)
        chat = client.chat.completions.create(
            model="adapter-0", messages=[{"role": "user", "content": "Hi"}], temperature=0
        )
        for usage in (plain.usage, chat.usage):
            assert usage.completion_tokens <= DEFAULT_MAX_TOKENS
        if plain.choices[0].finish_reason == "length":
            assert plain.usage.completion_tokens == DEFAULT_MAX_TOKENS
