"""The gateway endpoint: a Sipp gateway over HTTP, first-party JSON + SSE profile."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Mapping
from typing import Any

import httpx

from .._descriptors import GatewayDescriptor
from .._endpoint import EmbedRequest, Operation, TextRequest
from .._errors import InvalidRequestError, RemoteError, SippError
from .._types import (
    FinishReason,
    SippEmbeddingResponse,
    SippTextOptions,
    SippTextResponse,
    TokenBatch,
    Usage,
)
from ..protocol import codec
from ..protocol.errors import error_from_body
from ..protocol.sse import SSEEvent
from ._exchange import json_post
from ._provider_common import reject_images
from .endpoint import RemoteEndpoint

__all__ = ["GatewayAdapter", "gateway_endpoint"]


def gateway_endpoint(descriptor: GatewayDescriptor) -> RemoteEndpoint:
    return RemoteEndpoint.with_policy("gateway", GatewayAdapter(descriptor), descriptor.timeout)


def reject_local_options(request: TextRequest | EmbedRequest, where: str) -> None:
    if request.local is not None:
        raise InvalidRequestError(
            f"local options (context_key, grammar, json_schema, sampling, media, "
            f"normalize) are not accepted by {where}; drop `local=`"
        )
    if request.provider_options:
        raise InvalidRequestError(f"provider_options are not accepted by {where}")
    reject_images(request, where)


class GatewayAdapter:
    def __init__(self, descriptor: GatewayDescriptor) -> None:
        self.d = descriptor
        self.name = f"gateway {descriptor.base_url} (target {descriptor.target!r})"

    def supports(self, operation: Operation) -> bool:
        return True  # the gateway decides per target

    def supports_tools(self) -> bool:
        return False  # the native profile carries no tools

    def auth_value(self) -> str | Awaitable[str] | None:
        return self.d.auth_value()  # the value provider runs once per request

    def headers_for(self, auth_value: str | None) -> dict[str, str]:
        return {**self.d.static_headers, **self.d.auth_headers(auth_value)}

    def check_text(self, request: TextRequest) -> None:
        reject_local_options(request, "gateway endpoints")
        self._extra(request.endpoint_options)  # fail before anything is sent

    def check_embed(self, request: EmbedRequest) -> None:
        reject_local_options(request, "gateway endpoints")
        self._extra(request.endpoint_options)

    def _extra(self, endpoint_options: Mapping[str, Any] | None) -> dict[str, Any]:
        extra = {**self.d.protocol_options, **(endpoint_options or {})}
        codec.query_body("t", "", SippTextOptions(), stream=False, extra=extra)  # validates
        return extra

    def text_request(self, request: TextRequest, headers: dict[str, str]) -> httpx.Request:
        extra = self._extra(request.endpoint_options)
        stream = request.emit_tokens
        if request.operation == "query":
            assert request.prompt is not None
            body = codec.query_body(
                self.d.target, request.prompt, request.options, stream=stream, extra=extra
            )
            route = self.d.query_route
        else:
            assert request.messages is not None
            body = codec.chat_body(
                self.d.target, request.messages, request.options, stream=stream, extra=extra
            )
            route = self.d.chat_route
        return self._post(route, body, headers, stream)

    def embed_request(self, request: EmbedRequest, headers: dict[str, str]) -> httpx.Request:
        body = codec.embed_body(
            self.d.target, request.input, extra=self._extra(request.endpoint_options)
        )
        return self._post(self.d.embed_route, body, headers, False)

    def _post(
        self, route: str, body: dict[str, Any], headers: dict[str, str], stream: bool
    ) -> httpx.Request:
        return json_post(self.d.base_url.rstrip("/") + route, body, headers, stream)

    def parse_text(self, body: bytes) -> SippTextResponse:
        return codec.parse_text_response(body)

    def parse_embed(self, body: bytes) -> SippEmbeddingResponse:
        return codec.parse_embedding_response(body)

    def stream_parser(self) -> _GatewayStream:
        return _GatewayStream(self.name)

    def error(self, status: int, headers: httpx.Headers, body: bytes) -> SippError:
        return error_from_body(status, body, request_id=headers.get("x-request-id"))


class _GatewayStream:
    """`event: token` → batches, `usage` → kept, `done` → final, `error` → raised."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.text: list[str] = []
        self.usage: Usage | None = None

    def feed(self, event: SSEEvent) -> tuple[list[TokenBatch], SippTextResponse | None]:
        data = _json(event.data, self.name)
        if event.event == "token":
            text, seq = data.get("text"), data.get("sequence", len(self.text))
            if not isinstance(text, str) or not isinstance(seq, int):
                raise RemoteError(f"{self.name}: malformed token event {event.data[:120]!r}")
            self.text.append(text)
            return [TokenBatch(text, (), seq)], None
        if event.event == "usage":
            self.usage = codec.parse_usage(data)
            return [], None
        if event.event == "done":
            reason = data.get("finish_reason")
            if reason not in ("stop", "length", "cancelled"):
                raise RemoteError(f"{self.name}: malformed done event {event.data[:120]!r}")
            final_reason: FinishReason = reason
            return [], SippTextResponse("".join(self.text), final_reason, self.usage)
        if event.event == "error":
            error = error_from_body(500, event.data.encode())
            error.status = None  # the HTTP status was 200; the failure came mid-stream
            raise error
        return [], None  # unknown events are ignored, as SSE intends

    def end(self) -> SippTextResponse:
        raise RemoteError(f"{self.name}: the stream ended before its done event", retryable=True)


def _json(data: str, name: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError:
        raise RemoteError(f"{name}: SSE data is not JSON: {data[:120]!r}") from None
    if not isinstance(obj, dict):
        raise RemoteError(f"{name}: SSE data is not a JSON object: {data[:120]!r}")
    return obj
