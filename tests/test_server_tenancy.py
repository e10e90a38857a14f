"""End-to-end tenancy: API keys from an `--api-keys` file, 401 without/unknown key (before the
body is read), 403 for a model or admin route the key may not use, /v1/models filtered per key,
/health and /ready open, /metrics for admin and metrics keys only, key-file errors name the
entry's position and never the key.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from test_server_harness import LiveServer, make_app, openai_error, tiny_assets

from owq.server.auth import KeyFileError, KeyTable

KEYS = {
    "keys": {
        "sk-a": {"adapters": ["adapter-0"]},
        "sk-b": {"adapters": ["*"], "base": False},
        "sk-ops": {"admin": True},
        "sk-scrape": {"metrics": True, "base": False},
    }
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt, adapters = tiny_assets(tmp_path_factory.mktemp("tenancy"), num_adapters=2)
    with LiveServer(make_app(ckpt, adapters, keys=KEYS)) as s:
        s.wait_ready()
        yield s


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=60)


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def base(server):
    return client(server, "sk-ops").models.list().data[0].id


def test_no_key_or_unknown_key_is_401(server):
    err = openai_error(httpx.get(f"{server.base_url}/models"), 401)
    assert err["code"] == "missing_api_key"
    r = httpx.post(f"{server.base_url}/completions", json={"prompt": "x"}, headers=auth("sk-z"))
    assert openai_error(r, 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-wrong").models.list()


def test_models_are_filtered_per_key(server, base):
    assert [m.id for m in client(server, "sk-a").models.list().data] == [base, "adapter-0"]
    assert [m.id for m in client(server, "sk-b").models.list().data] == ["adapter-0", "adapter-1"]
    all_ids = [m.id for m in client(server, "sk-ops").models.list().data]
    assert all_ids == [base, "adapter-0", "adapter-1"]
    assert client(server, "sk-scrape").models.list().data == []


def test_disallowed_adapter_is_403_by_model_and_by_header(server, base):
    a = client(server, "sk-a")
    kw = {"prompt": "It is", "max_tokens": 2}
    assert a.completions.create(model="adapter-0", **kw).model == "adapter-0"
    assert a.completions.create(model=base, **kw).model == base
    with pytest.raises(openai.PermissionDeniedError):
        a.completions.create(model="adapter-1", **kw)
    with pytest.raises(openai.PermissionDeniedError):
        a.completions.create(model=base, extra_headers={"X-OWQ-Adapter": "adapter-1"}, **kw)
    with pytest.raises(openai.PermissionDeniedError):
        client(server, "sk-b").chat.completions.create(
            model=base, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    r = httpx.post(
        f"{server.base_url}/completions", headers=auth("sk-a"), json={"model": "adapter-1", **kw}
    )
    assert openai_error(r, 403)["code"] == "model_not_allowed"


def test_admin_routes_need_an_admin_key(server):
    url = f"{server.base_url}/adapters"
    openai_error(httpx.get(url), 401)
    assert openai_error(httpx.get(url, headers=auth("sk-a")), 403)["code"] == "admin_required"
    openai_error(httpx.post(url, json={"name": "adapter-0"}, headers=auth("sk-b")), 403)
    openai_error(httpx.delete(f"{url}/adapter-0", headers=auth("sk-a")), 403)
    assert httpx.get(url, headers=auth("sk-ops")).status_code == 200
    r = httpx.post(url, json={"name": "adapter-1"}, headers=auth("sk-ops"), timeout=60)
    assert r.status_code == 200, r.text


def test_health_and_ready_are_open_metrics_needs_a_metrics_key(server):
    for path in ("/health", "/ready"):
        assert httpx.get(f"{server.url}{path}").status_code == 200
    url = f"{server.url}/metrics"
    openai_error(httpx.get(url), 401)
    assert openai_error(httpx.get(url, headers=auth("sk-a")), 403)["code"] == "metrics_key_required"
    for key in ("sk-ops", "sk-scrape"):
        r = httpx.get(url, headers=auth(key))
        assert r.status_code == 200 and "owq_requests" in r.text
        assert r.headers["content-type"].startswith("text/plain")
    openai_error(httpx.post(f"{server.base_url}/completions", headers=auth("sk-scrape"),
                            json={"prompt": "x", "max_tokens": 1}), 403)  # fmt: skip


def test_unauthenticated_requests_get_401_before_the_body_is_read(server):
    url = f"{server.base_url}/completions"
    bad_json = {"content-type": "application/json"}
    assert openai_error(httpx.post(url, content=b"{not json", headers=bad_json), 401)
    huge = b"x" * (4 << 20)  # over the body limit, never read
    assert openai_error(httpx.post(url, content=huge, headers=bad_json), 401)
    r = httpx.post(url, content=b"{not json", headers={**bad_json, **auth("sk-a")})
    assert openai_error(r, 400)["code"] == "invalid_json"


def test_key_file_errors_name_the_entry_never_the_key(tmp_path):
    secret = "sk-do-not-print-me"
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": {"sk-a": {}, secret: {"admin": "yes", "extra": 1}}}))
    with pytest.raises(KeyFileError) as err:
        KeyTable.from_file(path)
    message = str(err.value)
    assert secret not in message
    assert str(path) in message and "entry 2 of 2" in message
