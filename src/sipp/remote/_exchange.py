"""What every HTTP endpoint shares: the adapter contract and one I/O-free exchange.

An adapter (gateway profile, OpenAI, Anthropic) only builds `httpx.Request`s
and parses bytes. `TextExchange`/`EmbedExchange` turn the bytes of one HTTP
response into channel events; the sync and async shells in `endpoint.py`
just move bytes, so both behave identically by construction.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any, Protocol

import httpx

from .._channel import RunChannel
from .._endpoint import EmbedRequest, Operation, TextRequest
from .._errors import RemoteError, SippError
from .._types import SippEmbeddingResponse, SippTextResponse, TokenBatch, Usage
from ..protocol.sse import SSEDecoder, SSEEvent

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

    def check_text(self, request: TextRequest) -> None: ...

    def check_embed(self, request: EmbedRequest) -> None: ...

    def text_request(self, request: TextRequest, headers: dict[str, str]) -> httpx.Request: ...

    def parse_text(self, body: bytes) -> SippTextResponse: ...

    def stream_parser(self) -> StreamParser: ...

    def embed_request(self, request: EmbedRequest, headers: dict[str, str]) -> httpx.Request: ...

    def parse_embed(self, body: bytes) -> SippEmbeddingResponse: ...

    def error(self, status: int, headers: httpx.Headers, body: bytes) -> SippError: ...


class _Exchange:
    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.status = 0
        self.headers = httpx.Headers()
        self.body = bytearray()

    def start(self, status: int, headers: httpx.Headers) -> None:
        self.status, self.headers = status, headers

    @property
    def failed(self) -> bool:
        return self.status >= 400

    def _collect(self, chunk: bytes) -> None:
        self.body += chunk
        if len(self.body) > MAX_BODY_BYTES:
            raise RemoteError(f"{self.adapter.name}: response body exceeds {MAX_BODY_BYTES} bytes")

    def _error(self) -> SippError:
        return self.adapter.error(self.status, self.headers, bytes(self.body))


class TextExchange(_Exchange):
    """Feeds one text response into a channel; `stream` decides JSON vs SSE."""

    def __init__(
        self, adapter: Adapter, channel: RunChannel[SippTextResponse], stream: bool
    ) -> None:
        super().__init__(adapter)
        self.channel = channel
        self.stream = stream
        self._decoder = SSEDecoder()
        self._parser = adapter.stream_parser() if stream else None
        self._text: list[str] = []
        self._usage: Usage | None = None
        self.finished = False

    def feed(self, chunk: bytes) -> bool:
        """Consume bytes; True once the outcome is known and the rest can be dropped."""
        if self.failed or self._parser is None:
            self._collect(chunk)
            return False
        for event in self._decoder.feed(chunk):
            try:
                batches, final = self._parser.feed(event)
            except SippError as exc:
                exc.partial_text = "".join(self._text)
                self._finish(exc)
                return True
            for batch in batches:
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

    def fail(self, error: SippError) -> None:
        if self.stream:
            error.partial_text = "".join(self._text)
        self._finish(error)

    def _finish(self, outcome: SippTextResponse | SippError) -> None:
        self.finished = True
        self.channel.finish(outcome)


class EmbedExchange(_Exchange):
    def __init__(self, adapter: Adapter, channel: RunChannel[SippEmbeddingResponse]) -> None:
        super().__init__(adapter)
        self.channel = channel
        self.finished = False

    def feed(self, chunk: bytes) -> bool:
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
