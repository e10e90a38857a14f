"""Pydantic v2 models of the OpenAI-compatible requests and responses the API speaks.

Requests ignore unknown fields (OpenAI clients send many optional ones) and take JSON types as
JSON Schema reads them (`true` or `"2"` for an integer or a token id is refused, `2.0` is the
integer 2); values are range-checked here, limits that depend on the server (n, logprobs,
prompts per request, the queue) in the routes and in the OpenAPI document (`openapi.py`). Text
must be valid Unicode (a lone surrogate such as "\\ud800" is refused). Knows nothing about the
engine or tokenizers.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_serializer,
)

from .protocol import ADAPTER_NAME_PATTERN, MAX_TEMPERATURE, MIN_TEMPERATURE, temperature_ok

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
    if not temperature_ok(value):
        raise ValueError(
            f"temperature must be 0 (greedy) or lie in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]"
        )
    return value


def _integral(value):
    """JSON Schema's integer: 2 and 2.0 alike; never 2.5, true or "2"."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Text = Annotated[str, AfterValidator(_unicode)]
# bounds before the validator, or pydantic writes them into the schema as "ge", not "minimum"
NonNegativeInt = Annotated[int, Field(ge=0), BeforeValidator(_integral)]
PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_integral)]
NonEmptyText = Annotated[Text, Field(min_length=1)]
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
    top_k: Annotated[int, Field(ge=-1), BeforeValidator(_integral)] = Field(
        0, description="extension; 0 or -1 = off"
    )
    stop: NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63), BeforeValidator(_integral)] | None = None
    ignore_eos: bool = Field(False, description="extension; decode past end-of-sequence tokens")
    n: PositiveInt = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None

    @property
    def stop_tuple(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


TokenIds = Annotated[list[NonNegativeInt], Field(min_length=1)]
Prompt = (
    NonEmptyText
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
    | Annotated[list[NonEmptyText], Field(min_length=1)]
)
CROSS_FIELD_RULES = (
    "Checked beyond this schema (400, `code` says which): the prompt plus max_tokens must fit "
    "the model's context (context_length_exceeded); n times the prompts must fit the queue "
    "(too_many_choices); max_tokens 0 needs echo (echo_required); the model's chat template "
    "may refuse messages (invalid_messages, no_chat_template, empty_prompt)."
)
CROSS_FIELD_CODES = (
    "context_length_exceeded",
    "too_many_choices",
    "echo_required",
    "invalid_messages",
    "no_chat_template",
    "empty_prompt",
)


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"description": CROSS_FIELD_RULES})

    prompt: Prompt
    max_tokens: NonNegativeInt | None = Field(None, description="default: the server's (256)")
    logprobs: NonNegativeInt | None = None
    echo: bool = Field(False, description="with max_tokens 0 (scoring); max_tokens 0 needs it")


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
    model_config = ConfigDict(json_schema_extra={"description": CROSS_FIELD_RULES})

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: NonNegativeInt | None = None


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=ADAPTER_NAME_PATTERN, description="a name in --adapters DIR")


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
