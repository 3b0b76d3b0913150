"""What every HTTP endpoint shares: the adapter contract and one I/O-free exchange.

An adapter (gateway profile, OpenAI, Anthropic) only builds `httpx.Request`s
and parses bytes. `TextExchange`/`EmbedExchange` turn the bytes of one HTTP
response into channel events; the sync and async shells in `endpoint.py`
just move bytes, so both behave identically by construction.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import httpx

from .._channel import RunChannel
from .._descriptors import GatewayTimeoutPolicy
from .._endpoint import EmbedRequest, Operation, TextRequest
from .._errors import RemoteError, SippError
from .._types import SippEmbeddingResponse, SippTextResponse, TokenBatch, Usage
from ..protocol.sse import MAX_EVENT_BYTES, SSEDecoder, SSEEvent
from ._content import ContentDecoder, content_decoder

__all__ = ["MAX_BODY_BYTES", "Adapter", "EmbedExchange", "StreamParser", "TextExchange"]

MAX_BODY_BYTES = 64 << 20  # a non-streamed body larger than this is refused, not buffered


def json_post(
    url: str, body: dict[str, Any], headers: dict[str, str], stream: bool
) -> httpx.Request:
    """A JSON POST that asks for SSE when `stream`, else JSON."""
    all_headers = {
        "content-type": "application/json",
        "accept": "text/event-stream" if stream else "application/json",
        **headers,
    }
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    return httpx.Request("POST", url, headers=all_headers, content=payload)


class StreamParser(Protocol):
    def feed(self, event: SSEEvent) -> tuple[list[TokenBatch], SippTextResponse | None]:
        """Batches carried by one SSE event, and the final response once the stream is done.
        Raises the typed error an error event carries."""

    def end(self) -> SippTextResponse:
        """The byte stream ended: the final response, or a RemoteError if it ended early."""


class Adapter(Protocol):
    name: str

    def auth_value(self) -> str | Awaitable[str] | None:
        """The credential for one request (a value provider may return an awaitable)."""

    def headers_for(self, auth_value: str | None) -> dict[str, str]: ...

    def supports(self, operation: Operation) -> bool: ...

    def supports_tools(self) -> bool: ...

    def check_text(self, request: TextRequest) -> None: ...

    def check_embed(self, request: EmbedRequest) -> None: ...

    def text_request(self, request: TextRequest, headers: dict[str, str]) -> httpx.Request: ...

    def parse_text(self, body: bytes) -> SippTextResponse: ...

    def stream_parser(self) -> StreamParser: ...

    def embed_request(self, request: EmbedRequest, headers: dict[str, str]) -> httpx.Request: ...

    def parse_embed(self, body: bytes) -> SippEmbeddingResponse: ...

    def error(self, status: int, headers: httpx.Headers, body: bytes) -> SippError: ...


class _Exchange:
    """State shared by both exchanges: status, headers, content decoding, the body cap
    and the deadline. `deadline` is a time on `clock`; the shells read it before every
    blocking step (connect, headers, each read) and give up once it has passed."""

    def __init__(self, adapter: Adapter, timeouts: GatewayTimeoutPolicy) -> None:
        self.adapter = adapter
        self.timeouts = timeouts
        self.status = 0
        self.headers = httpx.Headers()
        self.body = bytearray()
        self._content: ContentDecoder | None = None
        self._clock: Callable[[], float] = _no_clock
        self.deadline = 0.0

    def begin(self, clock: Callable[[], float]) -> None:
        """The request is about to be sent: the request deadline starts now."""
        self._clock = clock
        self.deadline = clock() + self.timeouts.request_s

    def start(self, status: int, headers: httpx.Headers) -> None:
        self.status, self.headers = status, headers
        try:
            self._content = content_decoder(headers.get("content-encoding"), self.adapter.name)
        except RemoteError:
            if not self.failed:
                raise
            # An error status stays the error; its undecodable body only loses the message.

    def feed(self, chunk: bytes) -> bool:
        """Consume raw body bytes; True once the outcome is known and the rest can be dropped."""
        if self._content is None:
            return self._feed(chunk)
        return any(self._feed(piece) for piece in self._content.feed(chunk))

    def _feed(self, data: bytes) -> bool:
        raise NotImplementedError

    @property
    def failed(self) -> bool:
        return self.status >= 400

    def timeout_error(self) -> RemoteError:
        return RemoteError(
            f"{self.adapter.name}: no complete response within the request deadline "
            f"({self.timeouts.request_s:g} s)",
            retryable=True,
            code="timeout",
        )

    def _collect(self, chunk: bytes) -> None:
        self.body += chunk
        if len(self.body) > MAX_BODY_BYTES:
            raise RemoteError(f"{self.adapter.name}: response body exceeds {MAX_BODY_BYTES} bytes")

    def _error(self) -> SippError:
        return self.adapter.error(self.status, self.headers, bytes(self.body))


def _no_clock() -> float:
    raise RuntimeError("begin() was not called")


class TextExchange(_Exchange):
    """Feeds one text response into a channel; `stream` decides JSON vs SSE."""

    def __init__(
        self,
        adapter: Adapter,
        channel: RunChannel[SippTextResponse],
        stream: bool,
        timeouts: GatewayTimeoutPolicy,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        super().__init__(adapter, timeouts)
        self.channel = channel
        self.stream = stream
        self._decoder = SSEDecoder(max_event_bytes)
        self._parser = adapter.stream_parser() if stream else None
        self._text: list[str] = []
        self._usage: Usage | None = None
        self._streaming = False  # the first token arrived: stream_read_s applies
        self.finished = False

    def _feed(self, chunk: bytes) -> bool:
        if self.failed or self._parser is None:
            self._collect(chunk)
            return False
        events = self._decoder.feed(chunk)
        if events and self._streaming:
            # Past the first token the request deadline is over: each frame may take
            # up to stream_read_s (a trickle that never completes a frame still fails).
            self.deadline = self._clock() + self.timeouts.stream_read_s
        for event in events:
            try:
                batches, final = self._parser.feed(event)
            except SippError as exc:
                exc.partial_text = "".join(self._text)
                self._finish(exc)
                return True
            for batch in batches:
                if not self._streaming:
                    self._streaming = True
                    self.deadline = self._clock() + self.timeouts.stream_read_s
                self._text.append(batch.text)
                self.channel.push(batch)
            if final is not None:
                self._finish(final)
                return True
        return False

    def end(self) -> None:
        if self.finished:
            return
        if self.failed:
            self._finish(self._error())
        elif self._parser is None:
            try:
                self._finish(self.adapter.parse_text(bytes(self.body)))
            except SippError as exc:
                self._finish(exc)
        else:
            try:
                self._finish(self._parser.end())
            except SippError as exc:
                exc.partial_text = "".join(self._text)
                self._finish(exc)

    def cancelled(self) -> None:
        self._finish(SippTextResponse("".join(self._text), "cancelled", self._usage))

    def timeout_error(self) -> RemoteError:
        if not self._streaming:
            return super().timeout_error()
        return RemoteError(
            f"{self.adapter.name}: the stream sent no event for {self.timeouts.stream_read_s:g} s",
            retryable=True,
            code="timeout",
        )

    def fail(self, error: SippError) -> None:
        if self.stream:
            error.partial_text = "".join(self._text)
        self._finish(error)

    def _finish(self, outcome: SippTextResponse | SippError) -> None:
        self.finished = True
        self.channel.finish(outcome)


class EmbedExchange(_Exchange):
    def __init__(
        self,
        adapter: Adapter,
        channel: RunChannel[SippEmbeddingResponse],
        timeouts: GatewayTimeoutPolicy,
    ) -> None:
        super().__init__(adapter, timeouts)
        self.channel = channel
        self.finished = False

    def _feed(self, chunk: bytes) -> bool:
        self._collect(chunk)
        return False

    def end(self) -> None:
        if self.finished:
            return
        try:
            outcome: SippEmbeddingResponse | SippError = (
                self._error() if self.failed else self.adapter.parse_embed(bytes(self.body))
            )
        except SippError as exc:
            outcome = exc
        self._finish(outcome)

    def cancelled(self) -> None:
        self._finish(RemoteError(f"{self.adapter.name}: embedding cancelled"))

    def fail(self, error: SippError) -> None:
        self._finish(error)

    def _finish(self, outcome: SippEmbeddingResponse | SippError) -> None:
        self.finished = True
        self.channel.finish(outcome)
