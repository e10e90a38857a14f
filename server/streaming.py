"""Server-sent events for streamed completions: headers, and errors after the first byte.

Once a stream has started its status is 200, so an engine failure mid-stream is sent as one
`data: {"error": {...}}` event followed by `data: [DONE]`. A client that goes away cancels the
generator, which closes every engine request of it (their slots free at the next step).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi.responses import StreamingResponse

from . import protocol as p
from .errors import ApiError, error_body, from_engine_error

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _guarded(chunks: AsyncIterator[str], cleanup) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield chunk
    except (ApiError, p.EngineError) as e:
        err = e if isinstance(e, ApiError) else from_engine_error(e)
        log.warning("stream failed after it started: %s", err.message)
        yield f"data: {_json(error_body(err.status, err.message, err.code, err.param))}\n\n"
        yield "data: [DONE]\n\n"
    except Exception:
        log.exception("stream failed after it started")
        yield f"data: {_json(error_body(500, 'internal server error', 'internal_error'))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if hasattr(chunks, "aclose"):
            await chunks.aclose()
        if cleanup is not None:
            await cleanup()


def _json(obj) -> str:
    import json

    return json.dumps(obj)


def stream_events(
    chunks: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]] | None = None
) -> StreamingResponse:
    """An SSE response of `chunks`; `cleanup()` runs when it ends, however it ends."""
    body = _guarded(chunks, cleanup)
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
