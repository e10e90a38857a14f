"""`POST /v1/chat/completions`: the tokenizer's chat template, then the same choice machinery.

Messages are rendered with `apply_chat_template(..., add_generation_prompt=True)`; streaming
sends a role delta first per choice, then content deltas, then the finish reason (and usage when
`stream_options.include_usage`). `logprobs`/`top_logprobs` come back in the chat shape.
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
    Prompt,
    check_limits,
    close_all,
    collect,
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
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    Delta,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from .streaming import stream_events

router = APIRouter()


def render_prompt(tokenizer, body: ChatCompletionRequest) -> Prompt:
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(
            400, "this model has no chat template: use /v1/completions", "no_chat_template"
        )
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template may raise on roles it does not support
        raise ApiError(
            400, f"the chat template rejected the messages: {e}", "invalid_messages", "messages"
        ) from None
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    if not ids:
        raise ApiError(400, "the rendered chat prompt is empty", "empty_prompt", "messages")
    return Prompt(text, ids)


def _top(d: dict[str, float] | None) -> list[TopLogprob]:
    items = sorted((d or {}).items(), key=lambda kv: -kv[1])
    return [TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in items]


def chat_logprobs(tokenizer, outs: list[p.TokenOutput]) -> ChatLogprobs:
    content = []
    for o in outs:
        tok = token_text(tokenizer, o.token_id)
        lp = o.logprob if o.logprob is not None else 0.0
        entry = TokenLogprob(token=tok, logprob=lp, bytes=list(tok.encode()))
        entry.top_logprobs = _top(o.top_logprobs)
        content.append(entry)
    return ChatLogprobs(content=content)


def usage(choices: list[Choice]) -> Usage:
    prompt = len(choices[0].prompt.ids)
    completion = sum(len(c.outputs) for c in choices)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={**streamed(ChatCompletionResponse, ChatCompletionChunk), **responses(*GENERATION)},
)
async def chat(body: ChatCompletionRequest, request: Request, who: Caller, ctx: ReadyCtx):
    start = time.perf_counter()
    engine, settings = ctx.engine, ctx.settings
    top = body.top_logprobs if body.top_logprobs is not None else 0
    check_limits(body.n, top, settings.max_n, settings.max_logprobs, "top_logprobs")
    target = await resolve_target(engine, who, body.model, request.headers.get(ADAPTER_HEADER))
    request.state.adapter_label = target.name
    prompt = render_prompt(engine.tokenizer, body)
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens = max_new_tokens(
        requested, len(prompt.ids), engine.max_context, settings.default_max_tokens
    )
    params = sampling_params(body, max_tokens, top if body.logprobs else None, False)
    rid = new_id("chatcmpl")
    choices = make_choices([prompt], body.n, params, target, rid, ctx.metrics, target.name, start)
    await unless_disconnected(request, open_choices(engine, choices))
    ctx.metrics.prompt_tokens.labels(target.name).inc(len(prompt.ids))
    if body.stream:
        chunks = stream_chunks(choices, body, engine.tokenizer, rid, target.name, ctx)
        return stream_events(chunks, lambda: close_all(choices))
    counter = ctx.metrics.generated_tokens.labels(target.name)
    await unless_disconnected(request, collect(choices, counter.inc))
    ctx.metrics.e2e.labels(target.name).observe(time.perf_counter() - start)
    out = [
        ChatChoice(
            index=c.index,
            message=AssistantMessage(content="".join(c.text)),
            logprobs=chat_logprobs(engine.tokenizer, c.outputs) if body.logprobs else None,
            finish_reason=finish(c),
        )
        for c in choices
    ]
    return ChatCompletionResponse(
        id=rid, created=now_s(), model=target.name, choices=out, usage=usage(choices)
    )


async def stream_chunks(
    choices: list[Choice], body: ChatCompletionRequest, tokenizer, rid: str, model: str, ctx
) -> AsyncIterator[str]:
    created, start = now_s(), choices[0].timer.start

    def chunk(index: int, delta: Delta, lp=None, reason=None, chunk_usage=None) -> str:
        one = ChatChunkChoice(index=index, delta=delta, logprobs=lp, finish_reason=reason)
        return sse(
            ChatCompletionChunk(
                id=rid, created=created, model=model, choices=[one], usage=chunk_usage
            )
        )

    for c in choices:
        yield chunk(c.index, Delta(role="assistant", content=""))
    async with aclosing(merge(choices)) as events:
        async for c, event in events:
            c.add(event)
            if not isinstance(event, p.TokenOutput):
                continue
            ctx.metrics.generated_tokens.labels(model).inc()
            lp = chat_logprobs(tokenizer, [event]) if body.logprobs else None
            yield chunk(c.index, Delta(content=event.text), lp, event.finish_reason)
    for c in choices:
        if c.finish_reason is None:
            yield chunk(c.index, Delta(), None, finish(c))
    if body.include_usage:
        yield sse(
            ChatCompletionChunk(
                id=rid, created=created, model=model, choices=[], usage=usage(choices)
            )
        )
    ctx.metrics.e2e.labels(model).observe(time.perf_counter() - start)
    yield sse("[DONE]")
