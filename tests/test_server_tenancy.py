"""End-to-end tenancy: API keys from an `--api-keys` file, 401 without/unknown key, 403 for a
model or admin route the key may not use, /v1/models filtered per key, ops routes open.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from test_server_harness import LiveServer, make_app, openai_error, tiny_assets

KEYS = {
    "keys": {
        "sk-a": {"adapters": ["adapter-0"]},
        "sk-b": {"adapters": ["*"], "base": False},
        "sk-ops": {"admin": True},
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


def test_ops_routes_are_open(server):
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 200
