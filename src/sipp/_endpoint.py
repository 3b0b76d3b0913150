"""What the client hands to an endpoint, and what every endpoint kind implements."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ._channel import RunChannel
from ._descriptors import EndpointKind
from ._types import (
    ChatMessage,
    LocalEmbedOptions,
    LocalTextOptions,
    SippEmbeddingResponse,
    SippTextOptions,
    SippTextResponse,
)

__all__ = ["EmbedRequest", "Endpoint", "Operation", "TextRequest"]

Operation = Literal["query", "chat", "embed"]


@dataclass(frozen=True)
class TextRequest:
    """A validated `query` (prompt set) or `chat` (messages set)."""

    operation: Literal["query", "chat"]
    prompt: str | None
    messages: tuple[ChatMessage, ...] | None
    options: SippTextOptions
    local: LocalTextOptions | None
    emit_tokens: bool
    endpoint_options: Mapping[str, Any] | None = None
    provider_options: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class EmbedRequest:
    input: str
    local: LocalEmbedOptions | None
    endpoint_options: Mapping[str, Any] | None = None
    provider_options: Mapping[str, Any] | None = None


class Endpoint(Protocol):
    """An endpoint runs requests without blocking the caller: `start_*` only enqueues
    (or starts I/O) and later completes the channel from its own thread or task.

    The `*_async` entry points are called from inside the caller's running event loop
    (AsyncSippClient); endpoints that do network I/O override them to run it as tasks
    on that loop. The defaults suit endpoints that never touch the loop."""

    kind: EndpointKind

    def supports(self, operation: Operation) -> bool: ...

    def start_text(self, request: TextRequest, channel: RunChannel[SippTextResponse]) -> None: ...

    def start_embed(
        self, request: EmbedRequest, channel: RunChannel[SippEmbeddingResponse]
    ) -> None: ...

    def runtime_metrics(self) -> dict[str, Any]: ...

    def close(self) -> None: ...

    def start_text_async(self, request: TextRequest, channel: RunChannel[SippTextResponse]) -> None:
        self.start_text(request, channel)

    def start_embed_async(
        self, request: EmbedRequest, channel: RunChannel[SippEmbeddingResponse]
    ) -> None:
        self.start_embed(request, channel)

    def start_embed_batch_async(
        self,
        requests: Sequence[EmbedRequest],
        channels: Sequence[RunChannel[SippEmbeddingResponse]],
    ) -> bool:
        """Start `requests` as one call that finishes `channels[i]` with input i's
        embedding (cancelling any channel cancels the call), in the caller's loop.
        False, with nothing started, when this endpoint embeds one input per call."""
        return False

    def supports_tools(self) -> bool:
        """True when this endpoint honours `SippTextOptions.tools` (and tool messages);
        the client refuses tools for any other endpoint rather than drop them."""
        return False

    def failure(self) -> str | None:
        """Why the endpoint stopped serving (e.g. its engine worker died), else None."""
        return None

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
