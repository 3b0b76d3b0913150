"""Turn a text run into the profile's SSE frames (for any ASGI or WSGI framework).

`token` frames while text arrives, then `usage` (when known) and `done`; a
failure after streaming started becomes one `error` frame. If the consumer
stops iterating (the HTTP client went away), the run is cancelled so its slot
or upstream request is freed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Protocol

from .._errors import ExecutionError, SippError
from .._types import SippTextResponse, TokenBatch
from .codec import done_frame, error_frame, token_frame, usage_frame


# What the helpers need of a run, structurally (`sipp.TextRun` / `sipp.AsyncTextRun` fit),
# so this I/O-free layer depends on the wire types only.
class TextRun(Protocol):
    @property
    def done(self) -> bool: ...

    def cancel(self, reason: str | None = None) -> None: ...

    def result(self) -> SippTextResponse: ...

    def __iter__(self) -> Iterator[TokenBatch]: ...


class AsyncTextRun(Protocol):
    @property
    def done(self) -> bool: ...

    def cancel(self, reason: str | None = None) -> None: ...

    async def result(self) -> SippTextResponse: ...

    def __aiter__(self) -> AsyncIterator[TokenBatch]: ...


__all__ = ["text_stream_frames", "text_stream_frames_async"]

SSE_HEADERS = {
    "content-type": "text/event-stream",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}


def text_stream_frames(run: TextRun) -> Iterator[bytes]:
    try:
        for batch in run:
            yield token_frame(batch)
        response = run.result()
    except Exception as exc:
        yield _failure_frame(exc)
        return
    finally:
        if not run.done:
            run.cancel("stream consumer went away")
    yield from _closing_frames(response)


async def text_stream_frames_async(run: AsyncTextRun) -> AsyncIterator[bytes]:
    try:
        async for batch in run:
            yield token_frame(batch)
        response = await run.result()
    except Exception as exc:
        yield _failure_frame(exc)
        return
    finally:
        if not run.done:
            run.cancel("stream consumer went away")
    for frame in _closing_frames(response):
        yield frame


def _failure_frame(exc: Exception) -> bytes:
    if isinstance(exc, SippError):
        return error_frame(exc)
    # Never leak a traceback to the wire.
    return error_frame(ExecutionError(f"internal error: {type(exc).__name__}"))


def _closing_frames(response: SippTextResponse) -> Iterator[bytes]:
    if response.usage is not None:
        yield usage_frame(response.usage)
    yield done_frame(response.finish_reason)
