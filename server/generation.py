"""From an OpenAI request to engine requests and back: model choice, prompts, choices, merging.

Shared by the completions and chat routes: resolves the adapter (header `X-OWQ-Adapter` or the
`model` field, one code path), tokenizes prompts, opens one engine request per choice
(seed + i), turns open-time `EngineError`s into HTTP errors before any byte is sent, merges the
choices' event streams and accumulates each choice. Knows the protocol, not tensors.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from . import protocol as p
from .auth import Principal
from .errors import ApiError, ClientGone
from .metrics import RequestTimer, ServerMetrics

ADAPTER_HEADER = "x-owq-adapter"


@dataclass(frozen=True)
class Target:
    """What a request runs on: `adapter` a registry handle (None = the base); `name` is echoed
    as `model` and labels the metrics."""

    adapter: object | None
    name: str


async def resolve_target(engine: p.Engine, who: Principal, model: str | None, header: str | None):
    """The header wins over the `model` field; the registry says which name is the base, and
    resolves an adapter once into the handle the request keeps (loading it on demand)."""
    adapter = engine.adapters.adapter_name((header or "").strip() or model)
    name = adapter or engine.model_name
    if not who.may_use(adapter):
        raise ApiError(403, f"this API key may not use model {p.shown(name)}", "model_not_allowed")
    return Target(await engine.adapters.resolve(adapter), name)


@dataclass
class Prompt:
    text: str
    ids: list[int]


def encode_prompts(tokenizer, prompt, max_prompts: int) -> list[Prompt]:
    """A string, list of strings, token ids or list of token-id lists -> prompts."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if len(prompts) > max_prompts:
        raise ApiError(
            400,
            f"at most {max_prompts} prompts per request, got {len(prompts)}",
            "too_many_prompts",
            "prompt",
        )
    vocab = len(tokenizer)
    out = []
    for item in prompts:
        if isinstance(item, str):
            out.append(Prompt(item, list(tokenizer(item).input_ids)))
            continue
        bad = [t for t in item if not 0 <= t < vocab]
        if bad:
            raise ApiError(
                400,
                f"token id {bad[0]} is outside the vocabulary [0, {vocab})",
                "invalid_token_id",
                "prompt",
            )
        out.append(Prompt(tokenizer.decode(item), list(item)))
    if any(not pr.ids for pr in out):
        raise ApiError(400, "prompt must not be empty", "empty_prompt", "prompt")
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class Choice:
    """One engine request and everything it produced so far."""

    index: int
    prompt: Prompt
    request: p.GenerationRequest
    timer: RequestTimer
    events: AsyncIterator | None = None
    first: p.PromptLogprobs | p.TokenOutput | None = None
    text: list[str] = field(default_factory=list)
    outputs: list[p.TokenOutput] = field(default_factory=list)
    prompt_logprobs: p.PromptLogprobs | None = None
    finish_reason: str | None = None

    def add(self, event) -> None:
        if isinstance(event, p.PromptLogprobs):
            self.prompt_logprobs = event
            return
        self.outputs.append(event)
        self.text.append(event.text)
        self.timer.token()
        if event.finish_reason:
            self.finish_reason = event.finish_reason


def make_choices(
    prompts: list[Prompt],
    n: int,
    params: p.SamplingParams,
    target: Target,
    rid: str,
    metrics: ServerMetrics,
    label: str,
    start: float,
) -> list[Choice]:
    """Prompt-major order (index = prompt_i * n + j), choice j seeded seed + j."""
    choices = []
    for i, pr in enumerate(prompts):
        for j in range(n):
            seed = None if params.seed is None else wrap_int64(params.seed + j)
            sp = p.SamplingParams(**{**params.__dict__, "seed": seed})
            req = p.GenerationRequest(f"{rid}-{len(choices)}", tuple(pr.ids), sp, target.adapter)
            timer = RequestTimer(metrics, label, start)
            choices.append(Choice(i * n + j, pr, req, timer))
    return choices


def wrap_int64(x: int) -> int:
    return (x + 2**63) % 2**64 - 2**63


async def _open(engine: p.Engine, choice: Choice) -> None:
    events = aiter(engine.generate(choice.request))
    choice.events = events
    with contextlib.suppress(StopAsyncIteration):
        choice.first = await anext(events)


async def close_all(choices: list[Choice]) -> None:
    for c in choices:
        if c.events is not None and hasattr(c.events, "aclose"):
            with contextlib.suppress(Exception):
                await c.events.aclose()


def check_fits_queue(engine: p.Engine, choices: list[Choice]) -> None:
    """A request whose choices could never all wait in the queue is a 400, not a 429."""
    if len(choices) > engine.max_queue:
        raise ApiError(
            400,
            f"this request asks for {len(choices)} choices (n x prompts), more than this "
            f"server's queue holds ({engine.max_queue}, --max-queue): send fewer at a time",
            "too_many_choices",
            "n",
        )


async def open_choices(engine: p.Engine, choices: list[Choice]) -> None:
    """Start every choice and wait for its first event; on any error close all and raise it."""
    check_fits_queue(engine, choices)
    try:
        opening = (_open(engine, c) for c in choices)
        results = await asyncio.gather(*opening, return_exceptions=True)
    except BaseException:  # cancelled: the client left while its choices were queued
        await close_all(choices)
        raise
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await close_all(choices)
        raise errors[0]


async def _pump(choice: Choice, queue: asyncio.Queue) -> None:
    try:
        if choice.first is not None:
            await queue.put((choice, choice.first))
            async for event in choice.events:
                await queue.put((choice, event))
    except Exception as e:  # an engine failure mid-stream reaches the consumer
        await queue.put((choice, e))
    finally:
        await queue.put((choice, None))


async def merge(choices: list[Choice]) -> AsyncIterator[tuple[Choice, object]]:
    """(choice, event) in arrival order across choices; closing it cancels every choice."""
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(c, queue)) for c in choices]
    try:
        remaining = len(choices)
        while remaining:
            choice, event = await queue.get()
            if event is None:
                remaining -= 1
                continue
            if isinstance(event, Exception):
                raise event
            yield choice, event
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(choices)


DISCONNECT_POLL_S = 0.5


async def unless_disconnected(request, coro):
    """Await `coro`, polling the connection; cancel it and raise ClientGone if the client leaves."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def collect(choices: list[Choice], on_token) -> None:
    """Run every choice to its end (a non-streamed response), calling `on_token()` per token."""
    async with contextlib.aclosing(merge(choices)) as events:
        async for choice, event in events:
            choice.add(event)
            if isinstance(event, p.TokenOutput):
                on_token()


def sampling_params(body, max_tokens: int, logprobs: int | None, echo: bool) -> p.SamplingParams:
    return p.SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        stop=body.stop_tuple,
        seed=body.seed,
        logprobs=logprobs,
        echo=echo,
        ignore_eos=body.ignore_eos,
    )


def max_new_tokens(requested: int | None, prompt_len: int, max_context: int, default: int) -> int:
    """`requested`, else the server's default, capped by the room the context leaves."""
    if requested is not None:
        return requested
    return min(default, max(max_context - prompt_len, 1))


def check_limits(n: int, logprobs: int | None, max_n: int, max_logprobs: int, lp_name: str):
    if n > max_n:
        raise ApiError(400, f"n must be at most {max_n}, got {n}", "invalid_value", "n")
    if logprobs is not None and logprobs > max_logprobs:
        raise ApiError(
            400,
            f"{lp_name} must be at most {max_logprobs}, got {logprobs}",
            "invalid_value",
            lp_name,
        )


def now_s() -> int:
    return int(time.time())


def sse(data) -> str:
    """One server-sent event: a pydantic model, a dict or the literal `[DONE]`."""
    if isinstance(data, str):
        return f"data: {data}\n\n"
    if hasattr(data, "model_dump_json"):
        return f"data: {data.model_dump_json()}\n\n"
    import json

    return f"data: {json.dumps(data)}\n\n"


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def finish(choice: Choice) -> str:
    """The finish reason; a stream that ended without one ran out of tokens."""
    return choice.finish_reason or "length"
