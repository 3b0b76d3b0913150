"""OpenAI and OpenAI-compatible providers.

query -> POST /completions {prompt}; chat -> POST /chat/completions {messages};
embed -> POST /embeddings {input, encoding_format: "float"}. Streams are SSE
`data:` chunks ending with `data: [DONE]`; usage arrives in a final chunk when
requested with `stream_options.include_usage`. Tools go with chat only (the
completions API has none); their wire shapes are in `_openai_tools`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from .._channel import RunChannel
from .._descriptors import GatewayTimeoutPolicy, ProviderDescriptor
from .._endpoint import EmbedRequest, Operation, TextRequest
from .._errors import InvalidRequestError, RemoteError, SippError
from .._types import FinishReason, SippEmbeddingResponse, SippTextResponse, TokenBatch, Usage
from ..protocol.codec import options_fields
from ..protocol.sse import SSEEvent
from ._exchange import EmbedExchange
from ._openai_tools import chat_message, response_tool_calls, stream_tool_deltas, tool_fields
from ._provider_common import ProviderBase, load_json, merge_provider_options
from ._tool_calls import StreamedToolCalls, settle_finish
from .endpoint import RemoteEndpoint

__all__ = ["OpenAIAdapter", "openai_endpoint"]

_TYPED = frozenset(
    {
        "model",
        "prompt",
        "messages",
        "input",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "stream",
        "stream_options",
        "encoding_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    }
)


def openai_endpoint(descriptor: ProviderDescriptor) -> RemoteEndpoint:
    return _OpenAIEndpoint.with_policy("provider", OpenAIAdapter(descriptor), descriptor.timeout)


class _OpenAIEndpoint(RemoteEndpoint):
    """`/embeddings` takes an array of inputs: a batch is one upstream request."""

    def start_embed_batch_async(
        self,
        requests: Sequence[EmbedRequest],
        channels: Sequence[RunChannel[SippEmbeddingResponse]],
    ) -> bool:
        adapter = self.adapter
        assert isinstance(adapter, OpenAIAdapter)
        for request in requests:
            adapter.check_embed(request)
        lead = channels[0]  # the exchange's own channel: cancelling it cancels the call
        for channel in channels[1:]:
            channel.on_cancel(lambda: lead.request_cancel("an input of the batch was cancelled"))
        inputs = [request.input for request in requests]
        self._spawn(
            lambda headers: adapter.embed_batch_request(inputs, headers),
            _BatchEmbedExchange(adapter, channels, self.timeouts),
        )
        return True


def _finish(reason: Any) -> FinishReason:
    # content_filter and the legacy function_call mean the model stopped on its own.
    if reason == "length":
        return "length"
    return "tool_calls" if reason == "tool_calls" else "stop"


def _usage(obj: Any) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    try:
        prompt = int(obj.get("prompt_tokens", 0))
        completion = int(obj.get("completion_tokens", 0))
        return Usage(prompt, completion, int(obj.get("total_tokens", prompt + completion)))
    except (TypeError, ValueError):
        return None


class OpenAIAdapter(ProviderBase):
    typed_fields = _TYPED

    def supports(self, operation: Operation) -> bool:
        return True

    def supports_tools(self) -> bool:
        return True

    def check_text(self, request: TextRequest) -> None:
        super().check_text(request)
        if request.operation == "query" and request.options.tools:
            raise InvalidRequestError(
                f"{self.name}: tools need chat; the completions API that query uses has none"
            )
        tool_fields(request.options)  # a schema json cannot encode fails before sending

    def text_request(self, request: TextRequest, headers: dict[str, str]) -> httpx.Request:
        o = request.options
        body: dict[str, Any] = {"model": self.d.model}
        if request.operation == "query":
            path, body["prompt"] = "/completions", request.prompt
        else:
            assert request.messages is not None
            path = "/chat/completions"
            body["messages"] = [chat_message(m) for m in request.messages]
            body.update(tool_fields(o))
        # OpenAI's chat API replaced max_tokens (reasoning models reject it); compatible
        # servers and the completions API still use max_tokens.
        chat_on_openai = self.d.provider == "openai" and request.operation == "chat"
        body.update(
            options_fields(o, max_key="max_completion_tokens" if chat_on_openai else "max_tokens")
        )
        if request.emit_tokens:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        body = merge_provider_options(body, request.provider_options, _TYPED)
        return self.post(path, body, headers, request.emit_tokens)

    def parse_text(self, body: bytes) -> SippTextResponse:
        obj = load_json(body, self.name, "response")
        try:
            choice = obj["choices"][0]
            message = None if "text" in choice else choice["message"]
            text = choice["text"] if message is None else message.get("content") or ""
            if not isinstance(text, str):
                raise TypeError("text is not a string")
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise RemoteError(f"{self.name}: unexpected response shape ({exc})") from None
        calls = () if message is None else response_tool_calls(message, self.name)
        reason = settle_finish(_finish(choice.get("finish_reason")), calls, self.name)
        return SippTextResponse(text, reason, _usage(obj.get("usage")), tool_calls=calls)

    def stream_parser(self) -> _OpenAIStream:
        return _OpenAIStream(self.name)

    def embed_request(self, request: EmbedRequest, headers: dict[str, str]) -> httpx.Request:
        body = {"model": self.d.model, "input": request.input, "encoding_format": "float"}
        body = merge_provider_options(body, request.provider_options, _TYPED)
        return self.post("/embeddings", body, headers, False)

    def embed_batch_request(self, inputs: list[str], headers: dict[str, str]) -> httpx.Request:
        body = {"model": self.d.model, "input": inputs, "encoding_format": "float"}
        return self.post("/embeddings", body, headers, False)

    def parse_embed_batch(self, body: bytes, count: int) -> list[SippEmbeddingResponse]:
        """`count` embeddings in input order; the batch's usage rides on the first."""
        obj = load_json(body, self.name, "response")
        try:
            items = sorted(obj["data"], key=lambda item: int(item["index"]))
            vectors = [[float(v) for v in item["embedding"]] for item in items]
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteError(f"{self.name}: unexpected embedding shape ({exc})") from None
        if len(vectors) != count:
            raise RemoteError(f"{self.name}: {len(vectors)} embeddings for {count} inputs")
        usage = _embed_usage(obj.get("usage"))
        return [
            SippEmbeddingResponse(v, "provider", False, len(v), usage if i == 0 else None)
            for i, v in enumerate(vectors)
        ]

    def parse_embed(self, body: bytes) -> SippEmbeddingResponse:
        obj = load_json(body, self.name, "response")
        try:
            values = [float(v) for v in obj["data"][0]["embedding"]]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise RemoteError(f"{self.name}: unexpected embedding shape ({exc})") from None
        return SippEmbeddingResponse(
            values, "provider", False, len(values), _embed_usage(obj.get("usage"))
        )


def _embed_usage(usage: Any) -> Usage | None:
    if isinstance(usage, dict) and "prompt_tokens" in usage:
        n = int(usage["prompt_tokens"])
        return Usage(n, 0, int(usage.get("total_tokens", n)))
    return None


class _BatchEmbedExchange(EmbedExchange):
    """One `/embeddings` response finishing every channel of the batch."""

    def __init__(
        self,
        adapter: OpenAIAdapter,
        channels: Sequence[RunChannel[SippEmbeddingResponse]],
        timeouts: GatewayTimeoutPolicy,
    ) -> None:
        super().__init__(adapter, channels[0], timeouts)
        self.openai = adapter
        self.channels = channels

    def end(self) -> None:
        if self.finished:
            return
        try:
            if self.failed:
                raise self._error()
            outcomes = self.openai.parse_embed_batch(bytes(self.body), len(self.channels))
        except SippError as exc:
            self._finish(exc)
            return
        self.finished = True
        for channel, outcome in zip(self.channels, outcomes):
            channel.finish(outcome)

    def _finish(self, outcome: SippEmbeddingResponse | SippError) -> None:
        self.finished = True
        for channel in self.channels:
            channel.finish(outcome)


class _OpenAIStream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.text: list[str] = []
        self.reason: FinishReason | None = None
        self.usage: Usage | None = None
        self.sequence = 0
        self.tools = StreamedToolCalls(name)

    def feed(self, event: SSEEvent) -> tuple[list[TokenBatch], SippTextResponse | None]:
        if event.data.strip() == "[DONE]":
            if self.reason is None:
                raise RemoteError(
                    f"{self.name}: stream finished without a finish_reason", retryable=True
                )
            calls = self.tools.calls()
            reason = settle_finish(self.reason, calls, self.name)
            return [], SippTextResponse("".join(self.text), reason, self.usage, tool_calls=calls)
        obj = load_json(event.data.encode(), self.name, "stream chunk")
        if "error" in obj:  # some compatible servers report failures inside the stream
            message = (
                obj["error"].get("message") if isinstance(obj["error"], dict) else obj["error"]
            )
            raise RemoteError(f"{self.name}: error in stream: {message}", retryable=True)
        batches = []
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            piece = choice.get("text")
            if piece is None:
                piece = delta.get("content")
            raw = delta.get("tool_calls")
            deltas = () if raw is None else stream_tool_deltas(raw, self.tools, self.name)
            if piece:
                self.text.append(piece)
            if piece or deltas:
                batches.append(TokenBatch(piece or "", sequence=self.sequence, tool_calls=deltas))
                self.sequence += 1
            if choice.get("finish_reason"):
                self.reason = _finish(choice["finish_reason"])
        if obj.get("usage"):
            self.usage = _usage(obj["usage"])
        return batches, None

    def end(self) -> SippTextResponse:
        raise RemoteError(f"{self.name}: the stream ended before data: [DONE]", retryable=True)
