"""schemathesis against the app's own OpenAPI document, on a real server (tiny checkpoint).

Every documented route gets bounded generated examples, valid and invalid; every check runs: no
5xx, status codes, content types, headers and bodies as the document says, schema-valid requests
accepted and invalid ones refused; and every error is in OpenAI's shape. A failure prints the
curl command that reproduces it.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from test_server_harness import LiveServer, make_app, tiny_assets

EXAMPLES = 25  # per route: the run stays well under 3 minutes on two shared cores
ADMIN_KEY = "sk-fuzz-admin"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt, adapters = tiny_assets(tmp_path_factory.mktemp("fuzz"), num_adapters=2)
    limits = {"max_n": 2, "max_prompts": 2, "default_max_tokens": 8, "max_body_bytes": 65536}
    app = make_app(ckpt, adapters, settings=limits, max_batch=4, max_queue=16)
    with LiveServer(app) as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def openai_error_shape(ctx, response, case) -> None:
    """An error status carries {"error": {message, type, param, code}}, message non-empty."""
    if response.status_code < 400 or case.path == "/ready":  # /ready answers its own status
        return
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


def fuzz(operation, mode: GenerationMode) -> None:
    """EXAMPLES generated cases of one operation, every check on each (raises on the first
    failure, with the case that reproduces it)."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case) -> None:
        case.call_and_validate(additional_checks=[openai_error_shape], timeout=60)

    run()


def test_every_route_is_documented(server, api_schema):
    documented = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    routes = {
        (method, route.path)
        for route in server.app.routes
        if route.path not in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
        for method in getattr(route, "methods", ()) - {"HEAD"}
    }
    assert routes == documented


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_document(api_schema, mode):
    failures = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        try:
            fuzz(operation, mode)
        except Exception as e:  # noqa: BLE001 - every operation runs; all failures reported
            failures.append(f"{operation.method.upper()} {operation.path}: {e}")
    assert not failures, "\n\n".join(failures)
