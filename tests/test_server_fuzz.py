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
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from test_server_harness import LiveServer, make_app, tiny_assets

from owq.server.schemas import CROSS_FIELD_CODES

EXAMPLES = 100  # per route and mode: the run stays under 3 minutes on two shared cores
ACCEPTED_REFUSALS = (400, 404, 409, 429)  # 400: CROSS_FIELD_CODES; 404/409: unknown/refused names


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


def accepted_unless_cross_field(ctx, response, case) -> None:
    """Schema-valid data is accepted, or refused only by a rule the document states beyond
    its schemas (CROSS_FIELD_CODES, e.g. the prompt plus max_tokens past the context)."""
    if response.status_code == 400:
        code = response.json()["error"]["code"]
        assert code in CROSS_FIELD_CODES, f"schema-valid request refused: {response.text}"
    assert response.status_code < 400 or response.status_code in ACCEPTED_REFUSALS, response.text


def fuzz(operation, mode: GenerationMode) -> None:
    """EXAMPLES generated cases of one operation, every check on each (raises on the first
    failure, with the case that reproduces it). Schema-valid cases get
    `accepted_unless_cross_field` in place of schemathesis's `positive_data_acceptance`,
    which knows no rule beyond the schemas."""
    checks = [openai_error_shape]
    excluded = []
    if mode == GenerationMode.POSITIVE:
        checks.append(accepted_unless_cross_field)
        excluded.append(positive_data_acceptance)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case) -> None:
        case.call_and_validate(additional_checks=checks, excluded_checks=excluded, timeout=60)

    run()


ROUTES = {
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/adapters"),
    ("POST", "/v1/adapters"),
    ("DELETE", "/v1/adapters/{name}"),
}


def test_every_route_is_documented(api_schema):
    documented = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert documented == ROUTES


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_document(api_schema, mode):
    failures = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        try:
            fuzz(operation, mode)
        except Unsatisfiable:  # nothing to violate (no parameters, any string is a valid id)
            assert mode == GenerationMode.NEGATIVE, operation.label
        except Exception as e:  # noqa: BLE001 - every operation runs; all failures reported
            failures.append(f"{operation.method.upper()} {operation.path}: {e}")
    assert not failures, "\n\n".join(failures)
