"""Anthropic Messages API.

query -> POST /messages with the prompt as one user message; chat -> POST
/messages with system messages joined into the top-level `system` field;
embed is unsupported (Anthropic has no embeddings API). Streams are named
SSE events: message_start, content_block_delta, message_delta, message_stop,
and `error`.
"""

from __future__ import annotations

from typing import Any

import httpx

from .._descriptors import ProviderDescriptor
from .._endpoint import EmbedRequest, Operation, TextRequest
from .._errors import RemoteError, UnsupportedOperationError
from .._types import FinishReason, SippEmbeddingResponse, SippTextResponse, TokenBatch, Usage
from ..protocol.codec import options_fields
from ..protocol.errors import error_from_status
from ..protocol.sse import SSEEvent
from ._provider_common import ProviderBase, load_json, merge_provider_options
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
    return "length" if reason == "max_tokens" else "stop"


class AnthropicAdapter(ProviderBase):
    typed_fields = _TYPED
    request_id_headers = ("request-id", "x-request-id")

    def supports(self, operation: Operation) -> bool:
        return operation != "embed"

    def auth_headers(self, key: str | None) -> dict[str, str]:
        headers = {"anthropic-version": self.d.anthropic_version}
        if key:
            headers["x-api-key"] = key
        return headers

    def check_embed(self, request: EmbedRequest) -> None:
        raise UnsupportedOperationError(
            "anthropic has no embeddings API; register an embedding endpoint"
        )

    def text_request(self, request: TextRequest, headers: dict[str, str]) -> httpx.Request:
        o = request.options
        if request.operation == "query":
            messages = [{"role": "user", "content": request.prompt}]
            system: list[str] = []
        else:
            assert request.messages is not None
            system = [m.content for m in request.messages if m.role == "system"]
            messages = [
                {"role": m.role, "content": m.content}
                for m in request.messages
                if m.role != "system"
            ]
        body: dict[str, Any] = {
            "model": self.d.model,
            "max_tokens": DEFAULT_MAX_TOKENS,  # required by Anthropic; the option overrides it
            "messages": messages,
            **options_fields(o, stop_key="stop_sequences"),
        }
        if system:
            body["system"] = "\n\n".join(system)
        if request.emit_tokens:
            body["stream"] = True
        body = merge_provider_options(body, request.provider_options, _TYPED)
        return self.post("/messages", body, headers, request.emit_tokens)

    def parse_text(self, body: bytes) -> SippTextResponse:
        obj = load_json(body, self.name, "response")
        try:
            text = "".join(block["text"] for block in obj["content"] if block.get("type") == "text")
            usage = obj.get("usage") or {}
            n_in, n_out = int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RemoteError(f"{self.name}: unexpected response shape ({exc})") from None
        return SippTextResponse(
            text, _finish(obj.get("stop_reason")), Usage(n_in, n_out, n_in + n_out)
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

    def feed(self, event: SSEEvent) -> tuple[list[TokenBatch], SippTextResponse | None]:
        if event.event == "ping":
            return [], None
        obj = load_json(event.data.encode(), self.name, "stream event")
        kind = obj.get("type", event.event)
        if kind == "message_start":
            usage = (obj.get("message") or {}).get("usage") or {}
            self.input_tokens = int(usage.get("input_tokens", 0))
            self.output_tokens = int(usage.get("output_tokens", 0))
        elif kind == "content_block_delta":
            delta = obj.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                self.text.append(delta["text"])
                return [TokenBatch(delta["text"], (), len(self.text) - 1)], None
        elif kind == "message_delta":
            self.reason = _finish((obj.get("delta") or {}).get("stop_reason"))
            usage = obj.get("usage") or {}
            self.output_tokens = int(usage.get("output_tokens", self.output_tokens))
        elif kind == "message_stop":
            usage = Usage(
                self.input_tokens, self.output_tokens, self.input_tokens + self.output_tokens
            )
            return [], SippTextResponse("".join(self.text), self.reason, usage)
        elif kind == "error":
            error = obj.get("error") or {}
            status = _ERROR_STATUS.get(str(error.get("type")), 500)
            raise error_from_status(
                status, f"anthropic stream error: {error.get('message', 'unknown')}"
            )
        return [], None

    def end(self) -> SippTextResponse:
        raise RemoteError(f"{self.name}: the stream ended before message_stop", retryable=True)
