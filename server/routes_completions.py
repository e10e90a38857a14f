"""`POST /v1/completions`: OpenAI legacy completions, streamed or not, with echo and logprobs.

The `logprobs` object is OpenAI's legacy one ({tokens, token_logprobs, top_logprobs,
text_offset}); with `echo` it starts with the prompt tokens (the first has logprob null), so
`max_tokens: 0, echo: true, logprobs: N` scores a prompt as lm-eval-harness's
`local-completions` expects. Knows the protocol and the schemas, not tensors.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request

from . import protocol as p
from .deps import Caller, ReadyCtx
from .errors import ApiError
from .generation import (
    ADAPTER_HEADER,
    Choice,
    check_limits,
    close_all,
    collect,
    encode_prompts,
    finish,
    make_choices,
    max_new_tokens,
    merge,
    new_id,
    now_s,
    open_choices,
    resolve_target,
    sampling_params,
    sse,
    token_text,
    unless_disconnected,
)
from .openapi import GENERATION, responses, streamed
from .schemas import CompletionChoice, CompletionRequest, CompletionResponse, LegacyLogprobs, Usage
from .streaming import stream_events

router = APIRouter()


class Offsets:
    """Running `text_offset` of one choice (0 at the echoed prompt, else after the prompt)."""

    def __init__(self, start: int):
        self.next = start

    def take(self, tokens: list[str]) -> list[int]:
        out = []
        for t in tokens:
            out.append(self.next)
            self.next += len(t)
        return out


def prompt_logprobs(pl: p.PromptLogprobs, offsets: Offsets) -> LegacyLogprobs:
    return LegacyLogprobs(
        tokens=list(pl.tokens),
        token_logprobs=list(pl.logprobs),
        top_logprobs=list(pl.top_logprobs),
        text_offset=offsets.take(list(pl.tokens)),
    )


def output_logprobs(tokenizer, outs: list[p.TokenOutput], offsets: Offsets) -> LegacyLogprobs:
    tokens = [token_text(tokenizer, o.token_id) for o in outs]
    return LegacyLogprobs(
        tokens=tokens,
        token_logprobs=[o.logprob for o in outs],
        top_logprobs=[o.top_logprobs for o in outs],
        text_offset=offsets.take(tokens),
    )


def merge_logprobs(a: LegacyLogprobs, b: LegacyLogprobs) -> LegacyLogprobs:
    return LegacyLogprobs(
        tokens=a.tokens + b.tokens,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        top_logprobs=a.top_logprobs + b.top_logprobs,
        text_offset=a.text_offset + b.text_offset,
    )


def full_choice(c: Choice, tokenizer, body: CompletionRequest) -> CompletionChoice:
    text = "".join(c.text)
    lp = None
    if body.logprobs is not None:
        offsets = Offsets(0 if body.echo else len(c.prompt.text))
        lp = LegacyLogprobs()
        if body.echo and c.prompt_logprobs is not None:
            lp = prompt_logprobs(c.prompt_logprobs, offsets)
        lp = merge_logprobs(lp, output_logprobs(tokenizer, c.outputs, offsets))
    if body.echo:
        text = c.prompt.text + text
    return CompletionChoice(index=c.index, text=text, logprobs=lp, finish_reason=finish(c))


def usage(choices: list[Choice], n: int) -> Usage:
    prompt = sum(len(c.prompt.ids) for c in choices[::n])
    completion = sum(len(c.outputs) for c in choices)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


@router.post(
    "/v1/completions",
    response_model=None,
    responses={**streamed(CompletionResponse, CompletionResponse), **responses(*GENERATION)},
)
async def completions(body: CompletionRequest, request: Request, who: Caller, ctx: ReadyCtx):
    start = time.perf_counter()
    engine, settings = ctx.engine, ctx.settings
    check_limits(body.n, body.logprobs, settings.max_n, settings.max_logprobs, "logprobs")
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(
            400, "max_tokens 0 needs echo (scoring the prompt)", "echo_required", "max_tokens"
        )
    target = await resolve_target(engine, who, body.model, request.headers.get(ADAPTER_HEADER))
    request.state.adapter_label = target.name
    prompts = encode_prompts(engine.tokenizer, body.prompt, settings.max_prompts)
    longest = max(len(pr.ids) for pr in prompts)
    max_tokens = max_new_tokens(
        body.max_tokens, longest, engine.max_context, settings.default_max_tokens
    )
    params = sampling_params(body, max_tokens, body.logprobs, body.echo)
    rid = new_id("cmpl")
    choices = make_choices(prompts, body.n, params, target, rid, ctx.metrics, target.name, start)
    await unless_disconnected(request, open_choices(engine, choices))
    ctx.metrics.prompt_tokens.labels(target.name).inc(sum(len(pr.ids) for pr in prompts))
    if body.stream:
        chunks = stream_chunks(choices, body, engine.tokenizer, rid, target.name, ctx)
        return stream_events(chunks, lambda: close_all(choices))
    counter = ctx.metrics.generated_tokens.labels(target.name)
    await unless_disconnected(request, collect(choices, counter.inc))
    ctx.metrics.e2e.labels(target.name).observe(time.perf_counter() - start)
    return CompletionResponse(
        id=rid,
        created=now_s(),
        model=target.name,
        choices=[full_choice(c, engine.tokenizer, body) for c in choices],
        usage=usage(choices, body.n),
    )


async def stream_chunks(
    choices: list[Choice], body: CompletionRequest, tokenizer, rid: str, model: str, ctx
) -> AsyncIterator[str]:
    """SSE strings: the echoed prompt (if any), one chunk per token, finish, usage, [DONE]."""
    created, start = now_s(), choices[0].timer.start
    offsets = {c.index: Offsets(0 if body.echo else len(c.prompt.text)) for c in choices}

    def chunk(c: Choice, text: str, lp: LegacyLogprobs | None, reason: str | None = None):
        one = CompletionChoice(index=c.index, text=text, logprobs=lp, finish_reason=reason)
        return sse(CompletionResponse(id=rid, created=created, model=model, choices=[one]))

    if body.echo:
        for c in choices:
            if not isinstance(c.first, p.PromptLogprobs):
                yield chunk(c, c.prompt.text, None)
    async with aclosing(merge(choices)) as events:
        async for c, event in events:
            c.add(event)
            if isinstance(event, p.PromptLogprobs):
                lp = prompt_logprobs(event, offsets[c.index]) if body.logprobs is not None else None
                yield chunk(c, c.prompt.text, lp)
                continue
            ctx.metrics.generated_tokens.labels(model).inc()
            lp = (
                output_logprobs(tokenizer, [event], offsets[c.index])
                if body.logprobs is not None
                else None
            )
            yield chunk(c, event.text, lp, event.finish_reason)
    for c in choices:
        if c.finish_reason is None:
            yield chunk(c, "", None, finish(c))
    if body.include_usage:
        yield sse(
            CompletionResponse(
                id=rid, created=created, model=model, choices=[], usage=usage(choices, body.n)
            )
        )
    ctx.metrics.e2e.labels(model).observe(time.perf_counter() - start)
    yield sse("[DONE]")
