"""Pydantic v2 models of the OpenAI-compatible requests and responses the API speaks.

Requests ignore unknown fields (OpenAI clients send many optional ones) and take JSON types as
they are (strict: `n: 1.0`, `true` for an integer or a token id are refused, as the OpenAPI
document says); values are range-checked here, limits that depend on the server (n, logprobs,
prompts per request, the queue) in the routes. Text must be valid Unicode (a lone surrogate such
as "\\ud800" is refused). Knows nothing about the engine or tokenizers.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_serializer,
)

from .protocol import MAX_TEMPERATURE, MIN_TEMPERATURE

MAX_STOP = 16
STRICT = ConfigDict(extra="ignore", strict=True)


def _unicode(text: str) -> str:
    """Refuse a lone UTF-16 surrogate (a valid JSON escape, not text: tokenizers cannot take it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"not valid Unicode text: a lone surrogate {text[e.start]!r} at character {e.start}"
        ) from None
    return text


def _temperature(value: float) -> float:
    if value != 0.0 and not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise ValueError(
            f"temperature must be 0 (greedy) or lie in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]"
        )
    return value


Text = Annotated[str, AfterValidator(_unicode)]
TEMPERATURE_SCHEMA = {
    "anyOf": [
        {"type": "number", "enum": [0]},
        {"type": "number", "minimum": MIN_TEMPERATURE, "maximum": MAX_TEMPERATURE},
    ],
    "description": "0 = greedy; else the softmax temperature",
}
Temperature = Annotated[float, AfterValidator(_temperature), WithJsonSchema(TEMPERATURE_SCHEMA)]


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = STRICT

    model: Text | None = None
    temperature: Temperature = 1.0
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="extension; 0 or -1 = off")
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # int64, as OpenAI's
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @property
    def stop_tuple(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = Text | list[int] | list[list[int]] | list[Text]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int | None = Field(None, ge=0, description="default: the server's (256)")
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and isinstance(v[0], list) and any(not p for p in v):
            raise ValueError("token-id prompts must not be empty")
        return v


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=256)


# ---- responses -------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class LegacyLogprobs(BaseModel):
    """The completions `logprobs` object (what lm-eval-harness reads)."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "owq"
    parent: str | None = None  # the base, for adapters
    status: Literal["loaded", "loadable"] = "loaded"  # loadable: loaded by the first request


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class AdapterCard(BaseModel):
    name: str
    loaded: bool
    status: Literal["loaded", "loadable", "refused"]
    base_fingerprint: str | None = None
    num_bytes: int | None = None
    load_seconds: float | None = None
    error: str | None = None  # why a refused adapter cannot be used, and the fix


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterCard]


class AdapterDeleted(BaseModel):
    name: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error status's body, in OpenAI's shape."""

    error: ErrorDetail


class ReadyStatus(BaseModel):
    status: Literal["ready", "loading", "shutting_down"]
    model: str | None = None


class HealthStatus(BaseModel):
    status: Literal["ok"]
