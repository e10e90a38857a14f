"""End-to-end: the real `openai` client against a real uvicorn server on the tiny checkpoint.

Completions and chat (plain, streamed, n, stop, seed), logprobs/echo incl. `max_tokens: 0`
(checked against the checkpoint's transformers model), adapter choice by `model` and by the
`X-OWQ-Adapter` header, /v1/models, and /metrics counters matching what the test sent.
"""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch
from test_server_harness import LiveServer, make_app, metric, tiny_assets

from owq.kernels.checkpoint import load_checkpoint

PROMPT = "It is a truth universally acknowledged"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def server(assets):
    ckpt, adapters = assets
    with LiveServer(make_app(ckpt, adapters, max_batch=8)) as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def base(client):
    return client.models.list().data[0].id


def complete(client, base, **kw):
    return client.completions.create(
        model=kw.pop("model", base), prompt=kw.pop("prompt", PROMPT), **kw
    )


def test_models_lists_base_then_adapters(client, base):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == base
    assert sorted(ids[1:]) == ["adapter-0", "adapter-1", "adapter-2"]


def test_completion_greedy_is_repeatable_and_counts_usage(client, base):
    a = complete(client, base, max_tokens=8, temperature=0)
    b = complete(client, base, max_tokens=8, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    assert a.object == "text_completion" and a.model == base
    assert a.choices[0].finish_reason in ("length", "stop")
    assert a.usage.completion_tokens <= 8
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens


def test_prompt_forms_string_list_and_token_ids(client, base, server):
    tok_ids = httpx.post(
        f"{server.base_url}/completions",
        json={"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 0},
    ).json()
    n_prompt = tok_ids["usage"]["prompt_tokens"]
    text = complete(client, base, max_tokens=4, temperature=0).choices[0].text
    batch = complete(client, base, prompt=[PROMPT, "Sir Walter"], max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == text
    ids = [list(range(2, 2 + n_prompt))]
    by_ids = complete(client, base, prompt=ids * 2, max_tokens=3, temperature=0)
    assert len(by_ids.choices) == 2 and by_ids.choices[0].text == by_ids.choices[1].text
    assert by_ids.usage.prompt_tokens == 2 * n_prompt


def test_seed_repeats_and_n_uses_seed_plus_i(client, base):
    kw = {"max_tokens": 12, "temperature": 1.0}
    a = complete(client, base, seed=5, **kw).choices[0].text
    assert complete(client, base, seed=5, **kw).choices[0].text == a
    many = complete(client, base, seed=5, n=3, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].text == a
    assert many.choices[1].text == complete(client, base, seed=6, **kw).choices[0].text
    texts = {c.text for c in complete(client, base, seed=0, n=4, **kw).choices}
    assert len(texts) > 1  # distinct seeds, distinct samples


def test_stop_string_cuts_text(client, base):
    full = complete(client, base, max_tokens=24, temperature=0).choices[0].text
    assert len(full) >= 4, full
    stop = full[2:4]
    cut = complete(client, base, max_tokens=24, temperature=0, stop=[stop, "zzzz"]).choices[0]
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


def test_ignore_eos_decodes_to_max_tokens(client, base):
    out = complete(client, base, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 24
    with pytest.raises(openai.BadRequestError, match="ignore_eos"):
        complete(client, base, max_tokens=2, extra_body={"ignore_eos": "sometimes"})


def test_streaming_matches_non_streaming(client, base):
    full = complete(client, base, max_tokens=10, temperature=0).choices[0].text
    chunks = list(complete(client, base, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    streamed_n = list(complete(client, base, max_tokens=6, seed=3, n=2, stream=True))
    by_index = {0: "", 1: ""}
    for c in streamed_n:
        by_index[c.choices[0].index] += c.choices[0].text
    plain = complete(client, base, max_tokens=6, seed=3, n=2)
    assert [by_index[0], by_index[1]] == [c.text for c in plain.choices]


def reference_logprobs(ckpt, ids: list[int]) -> list[float]:
    model = load_checkpoint(ckpt)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_echo_logprobs_score_the_prompt(client, base, assets):
    """lm-eval-harness's loglikelihood request: echo, logprobs, max_tokens 0 (and 1)."""
    out = complete(client, base, max_tokens=0, echo=True, logprobs=2)
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text == PROMPT
    assert "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert out.usage.prompt_tokens == len(lp.tokens) and out.usage.completion_tokens == 0
    ids = complete(client, base, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    assert len(ids.choices[0].logprobs.tokens) == len(lp.tokens)
    token_ids = _token_ids(client, base)
    want = reference_logprobs(assets[0], token_ids)
    assert all(
        math.isclose(g, w, abs_tol=2e-3) for g, w in zip(lp.token_logprobs[1:], want, strict=True)
    )
    for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        assert len(top) >= 2 and max(top.values()) >= chosen - 1e-6
    one = complete(client, base, prompt=[token_ids], max_tokens=1, echo=True, logprobs=1)
    scored = one.choices[0].logprobs
    assert len(scored.tokens) == len(token_ids) + 1
    assert all(
        math.isclose(a, b, abs_tol=2e-3)
        for a, b in zip(scored.token_logprobs[1:-1], want, strict=True)
    )


def _token_ids(client, base) -> list[int]:
    from engine_fixtures import tiny_tokenizer

    return tiny_tokenizer()(PROMPT).input_ids


def test_logprobs_without_echo_start_after_the_prompt(client, base):
    out = complete(client, base, max_tokens=5, temperature=0, logprobs=3).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset[0] == len(PROMPT)
    assert all(v <= 0 for v in lp.token_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert math.isclose(max(top.values()), chosen, abs_tol=1e-4)  # greedy: chosen is the max


def test_chat_plain_streamed_and_logprobs(client, base):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    full = client.chat.completions.create(
        model=base, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    msg = full.choices[0]
    assert full.object == "chat.completion" and msg.message.role == "assistant"
    assert len(msg.logprobs.content) == full.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in msg.logprobs.content)
    chunks = list(
        client.chat.completions.create(
            model=base,
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_adapter_by_model_and_by_header_agree(client, base):
    kw = {"max_tokens": 12, "temperature": 0}
    by_model = complete(client, base, model="adapter-1", **kw)
    by_header = complete(client, base, extra_headers={"X-OWQ-Adapter": "adapter-1"}, **kw)
    plain = complete(client, base, **kw)
    assert by_model.model == by_header.model == "adapter-1"
    assert by_model.choices[0].text == by_header.choices[0].text
    assert by_model.choices[0].text != plain.choices[0].text  # the adapter changes the model
    with pytest.raises(openai.NotFoundError):
        complete(client, base, model="no-such-adapter", **kw)


def test_metrics_count_what_was_sent(client, base, server):
    url = server.url

    def snapshot():
        return (
            metric(url, "owq_requests_total", adapter="adapter-2", status="200"),
            metric(url, "owq_generation_tokens_total", adapter="adapter-2"),
            metric(url, "owq_prompt_tokens_total", adapter="adapter-2"),
            metric(url, "owq_time_to_first_token_seconds_count", adapter="adapter-2"),
            metric(url, "owq_step_seconds_count", phase="prefill", adapters="1"),
            metric(url, "owq_step_seconds_count", phase="decode", adapters="1"),
        )

    before = snapshot()
    sent = [complete(client, base, model="adapter-2", max_tokens=m, temperature=0) for m in (3, 5)]
    streamed = list(complete(client, base, model="adapter-2", max_tokens=4, stream=True, seed=1))
    after = snapshot()
    generated = sum(r.usage.completion_tokens for r in sent) + sum(
        1 for c in streamed if c.choices[0].text or c.choices[0].finish_reason
    )
    assert after[0] - before[0] == 3
    assert after[1] - before[1] >= generated - 1 and after[1] - before[1] <= 3 + 5 + 4
    assert after[2] - before[2] == 3 * sent[0].usage.prompt_tokens
    assert after[3] - before[3] == 3
    # one prompt step each (alone, short prompts), then a decode step a later token
    assert after[4] - before[4] == 3
    assert 1 <= after[5] - before[5] <= (3 - 1) + (5 - 1) + (4 - 1)
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "owq_queue_depth",
        "owq_running_batch_size",
        "owq_adapters_loaded",
        "owq_inter_token_latency_seconds",
        "owq_e2e_request_latency_seconds",
        "owq_adapter_load_seconds",
        "owq_step_seconds",
    ):
        assert name in text
    assert metric(url, "owq_adapters_loaded") == 3
