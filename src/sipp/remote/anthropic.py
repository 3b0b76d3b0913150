"""Anthropic Messages API.

query -> POST /messages with the prompt as one user message; chat -> POST
/messages with system messages joined into the top-level `system` field;
embed is unsupported (Anthropic has no embeddings API). Streams are named
SSE events: message_start, content_block_start/delta/stop, message_delta,
message_stop, and `error`. Tool wire shapes are in `_anthropic_tools`.
"""

from __future__ import annotations

from typing import Any

import httpx

from .._descriptors import ProviderDescriptor
from .._endpoint import EmbedRequest, Operation, TextRequest
from .._errors import RemoteError, UnsupportedOperationError
from .._types import (
    FinishReason,
    SippEmbeddingResponse,
    SippTextResponse,
    TokenBatch,
    ToolCallDelta,
    Usage,
)
from ..protocol.codec import options_fields
from ..protocol.errors import error_from_status
from ..protocol.sse import SSEEvent
from ._anthropic_tools import chat_messages, response_content, tool_fields
from ._provider_common import ProviderBase, load_json, merge_provider_options
from ._tool_calls import StreamedToolCalls, settle_finish
from .endpoint import RemoteEndpoint

__all__ = ["AnthropicAdapter", "anthropic_endpoint"]

# Anthropic requires max_tokens; this is used when the request does not set one.
DEFAULT_MAX_TOKENS = 1024
_TYPED = frozenset(
    {
        "model",
        "messages",
        "system",
        "max_tokens",
        "temperature",
        "top_p",
        "stop_sequences",
        "stream",
        "tools",
        "tool_choice",
    }
)
# Anthropic's error types that mean "try again later" when they arrive mid-stream.
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


def anthropic_endpoint(descriptor: ProviderDescriptor) -> RemoteEndpoint:
    return RemoteEndpoint.with_policy("provider", AnthropicAdapter(descriptor), descriptor.timeout)


def _finish(reason: Any) -> FinishReason:
    if reason == "max_tokens":
        return "length"
    return "tool_calls" if reason == "tool_use" else "stop"


def _stop_sequence(obj: Any) -> str | None:
    """Which of the request's stop sequences ended the text (Anthropic says so)."""
    value = obj.get("stop_sequence") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


class AnthropicAdapter(ProviderBase):
    typed_fields = _TYPED
    request_id_headers = ("request-id", "x-request-id")

    def supports(self, operation: Operation) -> bool:
        return operation != "embed"

    def supports_tools(self) -> bool:
        return True

    def auth_headers(self, key: str | None) -> dict[str, str]:
        headers = {"anthropic-version": self.d.anthropic_version}
        if key:
            headers["x-api-key"] = key
        return headers

    def check_embed(self, request: EmbedRequest) -> None:
        raise UnsupportedOperationError(
            "anthropic has no embeddings API; register an embedding endpoint"
        )

    def check_text(self, request: TextRequest) -> None:
        super().check_text(request)
        # Fail before anything is sent: a schema json cannot encode, or a tool call whose
        # arguments are not an object.
        tool_fields(request.options)
        if request.messages is not None:
            chat_messages(request.messages)

    def text_request(self, request: TextRequest, headers: dict[str, str]) -> httpx.Request:
        o = request.options
        if request.operation == "query":
            messages: list[dict[str, Any]] = [{"role": "user", "content": request.prompt}]
            system: list[str] = []
        else:
            assert request.messages is not None
            system = [m.content for m in request.messages if m.role == "system"]
            messages = chat_messages(request.messages)
        body: dict[str, Any] = {
            "model": self.d.model,
            "max_tokens": DEFAULT_MAX_TOKENS,  # required by Anthropic; the option overrides it
            "messages": messages,
            **options_fields(o, stop_key="stop_sequences"),
            **tool_fields(o),
        }
        if system:
            body["system"] = "\n\n".join(system)
        if request.emit_tokens:
            body["stream"] = True
        body = merge_provider_options(body, request.provider_options, _TYPED)
        return self.post("/messages", body, headers, request.emit_tokens)

    def parse_text(self, body: bytes) -> SippTextResponse:
        obj = load_json(body, self.name, "response")
        text, calls = response_content(obj.get("content"), self.name)
        try:
            usage = obj.get("usage") or {}
            n_in, n_out = int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
        except (TypeError, ValueError, AttributeError) as exc:
            raise RemoteError(f"{self.name}: unexpected response shape ({exc})") from None
        reason = settle_finish(_finish(obj.get("stop_reason")), calls, self.name)
        return SippTextResponse(
            text,
            reason,
            Usage(n_in, n_out, n_in + n_out),
            tool_calls=calls,
            stop_sequence=_stop_sequence(obj),
        )

    def stream_parser(self) -> _AnthropicStream:
        return _AnthropicStream(self.name)

    def embed_request(self, request: EmbedRequest, headers: dict[str, str]) -> httpx.Request:
        raise UnsupportedOperationError("anthropic has no embeddings API")

    def parse_embed(self, body: bytes) -> SippEmbeddingResponse:
        raise UnsupportedOperationError("anthropic has no embeddings API")


class _AnthropicStream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.text: list[str] = []
        self.reason: FinishReason = "stop"
        self.input_tokens = 0
        self.output_tokens = 0
        self.sequence = 0
        self.tools = StreamedToolCalls(name)
        self.tool_blocks: dict[int, int] = {}  # content block index -> tool call index
        self.stop_sequence: str | None = None

    def feed(self, event: SSEEvent) -> tuple[list[TokenBatch], SippTextResponse | None]:
        if event.event == "ping":
            return [], None
        obj = load_json(event.data.encode(), self.name, "stream event")
        kind = obj.get("type", event.event)
        if kind == "message_start":
            usage = (obj.get("message") or {}).get("usage") or {}
            self.input_tokens = int(usage.get("input_tokens", 0))
            self.output_tokens = int(usage.get("output_tokens", 0))
        elif kind == "content_block_start":
            block = obj.get("content_block")
            if isinstance(block, dict) and block.get("type") == "tool_use":
                return self._batches(self._start_tool(obj, block)), None
        elif kind == "content_block_delta":
            delta = obj.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                self.text.append(delta["text"])
                return self._batches(text=delta["text"]), None
            if delta.get("type") == "input_json_delta":
                return self._batches(self._tool_arguments(obj, delta)), None
        elif kind == "content_block_stop":
            index = obj.get("index")
            call = self.tool_blocks.get(index) if isinstance(index, int) else None
            if call is not None:
                return self._batches(*self._empty_arguments([call])), None
        elif kind == "message_delta":
            delta = obj.get("delta") or {}
            self.reason = _finish(delta.get("stop_reason"))
            self.stop_sequence = _stop_sequence(delta)
            usage = obj.get("usage") or {}
            self.output_tokens = int(usage.get("output_tokens", self.output_tokens))
        elif kind == "message_stop":
            usage = Usage(
                self.input_tokens, self.output_tokens, self.input_tokens + self.output_tokens
            )
            batches = self._batches(*self._empty_arguments(self.tools.indices()))
            calls = self.tools.calls()
            reason = settle_finish(self.reason, calls, self.name)
            response = SippTextResponse(
                "".join(self.text),
                reason,
                usage,
                tool_calls=calls,
                stop_sequence=self.stop_sequence,
            )
            return batches, response
        elif kind == "error":
            error = obj.get("error") or {}
            status = _ERROR_STATUS.get(str(error.get("type")), 500)
            raise error_from_status(
                status, f"anthropic stream error: {error.get('message', 'unknown')}"
            )
        return [], None

    def end(self) -> SippTextResponse:
        raise RemoteError(f"{self.name}: the stream ended before message_stop", retryable=True)

    def _batches(self, *deltas: ToolCallDelta | None, text: str = "") -> list[TokenBatch]:
        calls = tuple(d for d in deltas if d is not None)
        if not text and not calls:
            return []
        self.sequence += 1
        return [TokenBatch(text, sequence=self.sequence - 1, tool_calls=calls)]

    def _block_index(self, obj: dict[str, Any]) -> int:
        index = obj.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            raise RemoteError(f"{self.name}: a {obj.get('type')} event has no block index")
        return index

    def _start_tool(self, obj: dict[str, Any], block: dict[str, Any]) -> ToolCallDelta | None:
        call = len(self.tools)  # tool calls are numbered apart from text blocks
        self.tool_blocks[self._block_index(obj)] = call
        return self.tools.delta(call, block.get("id"), block.get("name"), "")

    def _tool_arguments(self, obj: dict[str, Any], delta: dict[str, Any]) -> ToolCallDelta | None:
        call = self.tool_blocks.get(self._block_index(obj))
        fragment = delta.get("partial_json")
        if call is None:
            raise RemoteError(f"{self.name}: input_json_delta for a block that is not a tool_use")
        if not isinstance(fragment, str):
            raise RemoteError(
                f"{self.name}: tool call {call}: input_json_delta without a partial_json string"
            )
        return self.tools.delta(call, None, None, fragment)

    def _empty_arguments(self, calls: list[int]) -> list[ToolCallDelta]:
        """A call made without input streams no partial_json (or only ""): its input is {}."""
        out = []
        for call in calls:
            if not self.tools.has_arguments(call):
                made = self.tools.delta(call, None, None, "{}")
                if made is not None:
                    out.append(made)
        return out
