"""Run handles returned by `query`, `chat` and `embed` (sync and async twins)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any, Generic, TypeVar

from ._channel import RunChannel
from ._errors import InvalidRequestError
from ._types import SippEmbeddingResponse, SippTextResponse, TokenBatch

__all__ = ["AsyncEmbeddingRun", "AsyncTextRun", "EmbeddingRun", "TextRun"]

R = TypeVar("R")


class _Run(Generic[R]):
    def __init__(self, channel: RunChannel[R]) -> None:
        self._channel = channel

    def cancel(self, reason: str | None = None) -> None:
        """Stop the run; a text run then finishes with `finish_reason="cancelled"`."""
        self._channel.request_cancel(reason)

    @property
    def done(self) -> bool:
        return self._channel.done


class TextRun(_Run[SippTextResponse]):
    """A text generation in flight. Iterate it for `TokenBatch` values (when
    started with `emit_tokens=True`); `result()` waits for the final response."""

    def __init__(self, channel: RunChannel[SippTextResponse], emit_tokens: bool) -> None:
        super().__init__(channel)
        self._emit_tokens = emit_tokens

    def result(self, timeout: float | None = None) -> SippTextResponse:
        return self._channel.outcome(timeout)

    @property
    def tokens(self) -> Iterator[TokenBatch]:
        return iter(self)

    def __iter__(self) -> Iterator[TokenBatch]:
        if not self._emit_tokens:
            raise InvalidRequestError("this run was started without emit_tokens=True")
        while (batch := self._channel.next_batch()) is not None:
            yield batch
        self._channel.outcome()  # surface an error that ended the stream


class EmbeddingRun(_Run[SippEmbeddingResponse]):
    def result(self, timeout: float | None = None) -> SippEmbeddingResponse:
        return self._channel.outcome(timeout)


class _AsyncRun(_Run[R]):
    async def result(self) -> R:
        try:
            return await self._channel.outcome_async()
        except asyncio.CancelledError:
            # The awaiting task went away: free the engine's slot too.
            self.cancel("awaiting task cancelled")
            raise

    def __await__(self) -> Generator[Any, None, R]:
        return self.result().__await__()


class AsyncTextRun(_AsyncRun[SippTextResponse]):
    def __init__(self, channel: RunChannel[SippTextResponse], emit_tokens: bool) -> None:
        super().__init__(channel)
        self._emit_tokens = emit_tokens

    @property
    def _preparing(self) -> bool:
        """For the gateway: the endpoint has not accepted the run yet (a local request's
        template, tokens and grammar are still being prepared off the loop)."""
        return self._channel.preparing

    async def _accepted(self) -> None:
        """Wait until the endpoint accepted the run or the run ended."""
        await self._channel.accepted_async()

    @property
    def _batch_waiting(self) -> bool:
        """For the gateway: the next batch is already here (it joins such batches)."""
        return self._channel.batch_waiting

    @property
    def tokens(self) -> AsyncIterator[TokenBatch]:
        return self.__aiter__()

    async def __aiter__(self) -> AsyncIterator[TokenBatch]:
        if not self._emit_tokens:
            raise InvalidRequestError("this run was started without emit_tokens=True")
        try:
            while (batch := await self._channel.next_batch_async()) is not None:
                yield batch
        except asyncio.CancelledError:
            self.cancel("awaiting task cancelled")
            raise
        await self._channel.outcome_async()


class AsyncEmbeddingRun(_AsyncRun[SippEmbeddingResponse]):
    pass
