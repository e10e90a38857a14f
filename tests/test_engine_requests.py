"""Request semantics: stop strings, echo / prompt logprobs, limits, queue, cancellation."""

import asyncio

import pytest
from engine_fixtures import build_tiny_server_assets, collect, request, started_engine, text_of
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from owq.server.detokenize import TextStream, held_back
from owq.server.protocol import (
    ContextTooLong,
    GenerationRequest,
    InvalidRequest,
    PromptLogprobs,
    QueueFull,
    SamplingParams,
)

PROMPT = "It is a truth universally acknowledged"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_server_assets(tmp_path_factory.mktemp("req"), "llama", 1)


@pytest.fixture()
def engine(assets):
    eng = started_engine(*assets, max_batch=2, max_queue=2)
    yield eng
    if eng.ready():
        asyncio.run(eng.stop())


def run(coro):
    return asyncio.run(coro)


def test_stop_string_is_cut_and_never_emitted(engine):
    full = run(collect(engine, request(engine, PROMPT, max_tokens=40)))
    text = text_of(full)
    stop = text[9:12]
    cut = run(collect(engine, request(engine, PROMPT, max_tokens=40, stop=("zzz", stop))))
    assert text_of(cut) == text[: text.index(stop)]
    assert cut[-1].finish_reason == "stop"
    assert full[-1].finish_reason in ("length", "stop")
    assert all(e.finish_reason is None for e in cut[:-1])


def test_echo_with_max_tokens_zero_returns_prompt_logprobs_only(engine):
    req = request(engine, PROMPT, max_tokens=0, echo=True, logprobs=3)
    events = run(collect(engine, req))
    assert len(events) == 1 and isinstance(events[0], PromptLogprobs)
    p = events[0]
    assert p.token_ids == list(req.prompt_ids)
    assert "".join(p.tokens) == PROMPT
    assert p.logprobs[0] is None and all(v <= 0 for v in p.logprobs[1:])
    assert p.top_logprobs[0] is None and all(len(t) <= 3 for t in p.top_logprobs[1:])
    assert all(
        max(t.values()) >= lp - 1e-5
        for t, lp in zip(p.top_logprobs[1:], p.logprobs[1:], strict=True)
    )


def test_prompt_logprobs_do_not_depend_on_prefill_chunks(assets):
    eng = started_engine(*assets, prefill_chunk=3)
    req = request(eng, PROMPT, max_tokens=2, echo=True, logprobs=1)
    chunked = run(collect(eng, req))
    run(eng.stop())
    eng = started_engine(*assets)
    whole = run(collect(eng, req))
    run(eng.stop())
    assert chunked[0].logprobs[1:] == pytest.approx(whole[0].logprobs[1:], abs=1e-4)
    assert [e.token_id for e in chunked[1:]] == [e.token_id for e in whole[1:]]
    assert chunked[1].logprob == pytest.approx(whole[1].logprob, abs=1e-4)


def test_logprobs_of_generated_tokens(engine):
    events = run(collect(engine, request(engine, PROMPT, max_tokens=5, logprobs=2)))
    for e in events:  # greedy: the chosen token is the top alternative
        assert len(e.top_logprobs) == 2 and max(e.top_logprobs.values()) == pytest.approx(e.logprob)


def test_context_too_long_names_both_lengths(engine):
    n = len(request(engine, PROMPT).prompt_ids)
    with pytest.raises(ContextTooLong) as err:
        engine.generate(request(engine, PROMPT, max_tokens=engine.max_context))
    assert str(n) in str(err.value) and str(engine.max_context) in str(err.value)
    long = GenerationRequest("x", (5,) * (engine.max_context + 1), SamplingParams(max_tokens=0))
    with pytest.raises(ContextTooLong):
        engine.generate(long)


@pytest.mark.parametrize(
    "ids,params",
    [((), {}), ((1, 999), {}), ((1,), {"temperature": -1}), ((1,), {"top_p": 0}),
     ((1,), {"max_tokens": -1}), ((1,), {"logprobs": 100})],
)  # fmt: skip
def test_invalid_requests(engine, ids, params):
    with pytest.raises(InvalidRequest):
        engine.generate(GenerationRequest("x", ids, SamplingParams(**params)))


async def wait_until(condition, seconds=20.0):
    for _ in range(int(seconds / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def test_queue_full_and_cancel_frees_the_slot(engine):
    async def main():
        sched = engine.scheduler
        streams = [engine.generate(request(engine, PROMPT, rid=str(i), max_tokens=200))
                   for i in range(4)]  # fmt: skip
        await asyncio.gather(*(anext(s) for s in streams[:2]))  # two running (max_batch=2)
        firsts = [asyncio.create_task(anext(s)) for s in streams[2:]]
        await wait_until(lambda: sched.queued == 2)  # two waiting (max_queue=2)
        with pytest.raises(QueueFull):
            engine.generate(request(engine, PROMPT, max_tokens=5))
        for s in streams[:2]:
            await s.aclose()  # client gone: their rows free up at the next step
        await asyncio.gather(*firsts)
        for s in streams[2:]:
            await s.aclose()
        await wait_until(lambda: not sched.running and not sched.prefilling)
        assert sched.queued == 0 and all(p == 0 for p in engine.slots.pins)

    run(main())


def test_eos_ends_with_stop_unless_ignored(engine):
    reference = run(collect(engine, request(engine, PROMPT, max_tokens=12)))
    eos = reference[5].token_id
    engine.scheduler.eos_ids = frozenset({eos})
    events = run(collect(engine, request(engine, PROMPT, max_tokens=12)))
    first = [e.token_id for e in reference].index(eos)
    assert [e.token_id for e in events] == [e.token_id for e in reference[: first + 1]]
    assert events[-1].finish_reason == "stop" and events[-1].text == ""
    past = run(collect(engine, request(engine, PROMPT, max_tokens=12, ignore_eos=True)))
    assert [e.token_id for e in past] == [e.token_id for e in reference]
    assert past[-1].finish_reason == "length"


# detokenization -------------------------------------------------------------------------------
def byte_level_tokenizer():
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["café naïve — ünïcödé 日本語 text", "plain words here"],
                            vocab_size=300, show_progress=False)  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)


def test_text_stream_holds_partial_characters_and_stop_prefixes():
    tok = byte_level_tokenizer()
    text = "a café 日本 here"
    ids = tok(text)["input_ids"]
    stream = TextStream(tok, (), stops=("her",))
    pieces = [stream.push(i) for i in ids]
    out = "".join(p.text for p in pieces)
    assert out == "a café 日本 " and pieces[-1].stopped
    assert all("\ufffd" not in p.text for p in pieces)
    plain = TextStream(tok, ())
    assert "".join(plain.push(i).text for i in ids) + plain.flush() == text


def test_held_back():
    assert held_back("abc", ("cd", "xyz")) == 1
    assert held_back("abx", ("xyz",)) == 1
    assert held_back("abxy", ("xyz",)) == 2
    assert held_back("abc", ("xyz",)) == 0
