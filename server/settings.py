"""Settings of the HTTP layer (`owq serve`): limits, tenancy and names; nothing about the model.

A frozen pydantic model built by the CLI (or a test) and handed to `create_app`; the engine has
its own settings and never sees these.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .auth import KeyTable
from .protocol import DEFAULT_MAX_TOKENS

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB


class ServerSettings(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, gt=0)
    retry_after_s: int = Field(1, ge=0, description="Retry-After header of a 429 (queue full)")
    keys: KeyTable | None = None  # None: open server (a warning is logged at start-up)
    max_n: int = Field(16, ge=1, description="largest `n` (choices per prompt) accepted")
    max_prompts: int = Field(64, ge=1, description="largest batch of prompts in one request")
    max_logprobs: int = Field(20, ge=0, description="largest `logprobs` / `top_logprobs`")
    default_max_tokens: int = Field(
        DEFAULT_MAX_TOKENS, ge=1, description="max_tokens of a request that sets none"
    )
    start_engine: bool = True  # the app's lifespan starts and stops the engine
    preload_adapters: bool = False  # load every adapter of the adapters dir at start-up
