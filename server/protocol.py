"""The contract between the HTTP layer (`api`) and the engine (runtime + scheduler + adapters).

The API turns OpenAI requests into `GenerationRequest`s and streams the engine's events back;
the engine knows nothing about HTTP, JSON or authentication, the API nothing about tensors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

SHOWN_CHARS = 64
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # a name, never a path
DEFAULT_MAX_TOKENS = 256  # a chat or completion request without max_tokens (--default-max-tokens)
DEFAULT_MAX_LOADED = 64  # adapters in host memory at once (--max-loaded-adapters)


def shown(name: object) -> str:
    """A client's string for a message: its repr, cut to SHOWN_CHARS characters."""
    text = repr(name)
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[:SHOWN_CHARS]}... ({len(str(name))} characters)"


MIN_TEMPERATURE = 0.01  # below it (but > 0) logits / T overflow: refused, 0 means greedy
MAX_TEMPERATURE = 2.0


def temperature_ok(t: float) -> bool:
    """0 (greedy) or a temperature sampling can take."""
    return t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # 0 is allowed with echo (score the prompt only)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = ()
    seed: int | None = None  # same seed, same prompt, same adapter -> same tokens
    logprobs: int | None = None  # None = none; N >= 0 = chosen token + N top alternatives
    echo: bool = False  # also return the prompt tokens (with logprobs when logprobs is set)
    ignore_eos: bool = False  # decode past EOS to max_tokens (stop strings still end it)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    adapter: object | None = None  # a handle from AdapterManager.resolve/current; None = base


@dataclass
class PromptLogprobs:
    """First event when `echo` is set: the prompt tokens (the first has logprob None)."""

    token_ids: list[int]
    tokens: list[str]
    logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]


@dataclass
class TokenOutput:
    """One generated token; `text` is the decoded delta (stop strings already cut)."""

    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: dict[str, float] | None = None
    finish_reason: str | None = None  # "stop" | "length" on the last event, else None


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    base_fingerprint: str
    num_bytes: int
    load_seconds: float
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterState:
    """An adapter of the adapters dir: "loaded", "loadable" (on the first request naming it),
    or "refused" with the reason and its fix in `error`."""

    name: str
    status: str
    info: AdapterInfo | None = None
    error: str | None = None


class EngineError(Exception):
    """Base of the errors the API maps to HTTP statuses."""


class QueueFull(EngineError):  # 429 with Retry-After
    pass


class ContextTooLong(EngineError):  # 400, message names both lengths
    pass


class AdapterNotLoaded(EngineError):  # 404 for a request naming an unknown/unloaded adapter
    pass


class InvalidAdapterName(EngineError):  # 400: not a plain name (path-like, symlink out of dir)
    pass


class AdapterNotFound(EngineError):  # 404: no such adapter in --adapters DIR
    pass


class AdapterConflict(EngineError):  # 409: refused (other base, bad shape, NaN), with the fix
    pass


class AdapterBaseMismatch(AdapterConflict):  # 409: tuned on another base (names both)
    pass


class EngineNotReady(EngineError):  # 503
    pass


class InvalidRequest(EngineError):  # 400: empty prompt, token id outside the vocabulary, bad values
    pass


class GenerationFailed(EngineError):  # 500 for this request only (non-finite logits, no draw)
    pass


class EngineObserver(Protocol):
    """Hooks the engine calls so the API can export Prometheus metrics."""

    def on_step(self, running: int, queued: int) -> None: ...
    def on_phase(self, phase: str, adapters: str, seconds: float) -> None: ...
    def on_adapters(self, loaded: int, load_seconds: float | None) -> None: ...


class AdapterManager(Protocol):
    max_loaded: int  # adapters held in host memory at once

    def adapter_name(self, requested: str | None) -> str | None: ...  # None = the base
    def available(self) -> list[str]: ...  # adapter names found in the adapters dir
    def loaded(self) -> list[AdapterInfo]: ...
    def states(self) -> list[AdapterState]: ...  # loaded, loadable or refused (with why)
    async def load(self, name: str) -> AdapterInfo: ...  # replaces a loaded one of that name
    async def unload(self, name: str) -> None: ...
    async def resolve(self, name: str | None) -> object | None: ...  # handle, loads on demand


class Engine(Protocol):
    model_name: str  # the base's public name (what /v1/models lists first)
    max_context: int
    max_queue: int  # requests that may wait at once (a request with more choices is refused)
    tokenizer: object  # a transformers tokenizer (chat template lives there)
    adapters: AdapterManager

    def start(self) -> None: ...  # starts the model thread
    async def stop(self) -> None: ...
    def ready(self) -> bool: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[PromptLogprobs | TokenOutput]:
        """Raises QueueFull / ContextTooLong / InvalidRequest before the first event. Closing the
        iterator early (client gone) frees the request's slot at the next step."""
        ...
