"""Anthropic's Messages API (`POST /v1/messages`) as a wire format, so the official
`anthropic` client and tools built on it can use any gateway target unchanged.

The caller's gateway token comes as `x-api-key` (what the SDK sends) or as a
bearer token. Streams follow Anthropic's event order: `message_start`, per block
`content_block_start` / `content_block_delta`... / `content_block_stop`, then
`message_delta` (stop reason, output tokens) and `message_stop`; a failure after
the stream started is an `error` event. Errors use Anthropic's envelope.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response

from ... import protocol
from ..._errors import InvalidRequestError, SippError
from ..._types import ChatMessage, SippTextOptions, SippTextResponse, ToolCall, Usage
from ...protocol import load_json_object
from ..config import GatewayConfig
from ..request import (
    ChoiceDone,
    Completion,
    Event,
    GatewayRequest,
    Generation,
    Operation,
    ResponseFormat,
    TextDelta,
)
from .anthropic_tools import BlockStream, tool_fields, tool_use_blocks
from .base import (
    EVENT_STREAM_HEADERS,
    check_schema,
    check_stops,
    error_response,
    field_error,
    sse_event,
)

__all__ = ["AnthropicFormat"]

_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "stream",
        "metadata",
        "output_config",
        "cache_control",
        "thinking",
        "tools",
        "tool_choice",
    }
)
_TEXT_BLOCK = frozenset({"type", "text", "cache_control"})
_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class AnthropicFormat:
    operation: Operation = "chat"
    stream_headers = EVENT_STREAM_HEADERS

    def credential(self, headers: Headers) -> str | None:
        key = headers.get("x-api-key")
        if key is not None:
            return f"Bearer {key}"
        return headers.get("authorization")

    def decode(self, body: bytes, headers: Headers, config: GatewayConfig) -> GatewayRequest:
        version = headers.get("anthropic-version")
        if version is None or not _VERSION.match(version):
            raise InvalidRequestError(
                "the anthropic-version header is required (for example 2023-06-01)"
            )
        obj = load_json_object(body)
        for key in obj:
            if key not in _FIELDS:
                raise field_error(key, f"{key}: this field is not supported by this gateway")
        model = obj.get("model")
        if not isinstance(model, str) or not model:
            raise field_error("model", "model: field required (the gateway target name)")
        max_tokens = obj.get("max_tokens")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise field_error("max_tokens", "max_tokens: field required, a positive integer")
        temperature = _number(obj, "temperature", 0.0, 1.0)
        stream = obj.get("stream", False)
        if not isinstance(stream, bool):
            raise field_error("stream", "stream: must be a boolean")
        stops = obj.get("stop_sequences")
        if stops is not None and (
            not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)
        ):
            raise field_error("stop_sequences", "stop_sequences: must be an array of strings")
        check_stops(stops or [], "stop_sequences", protocol.MAX_STOPS, "stop_sequences: {}")
        top_k = obj.get("top_k")
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
        ):
            raise field_error("top_k", "top_k: must be a positive integer")
        try:
            options = SippTextOptions(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=_number(obj, "top_p", 0.0, 1.0),
                stop=stops or None,
                **tool_fields(obj),
            )
        except InvalidRequestError as exc:
            raise InvalidRequestError(exc.message) from None
        _cache_control(obj.get("cache_control"), "cache_control")
        _thinking(obj.get("thinking"))
        return GatewayRequest(
            "chat",
            model,
            messages=_system(obj.get("system")) + _messages(obj.get("messages")),
            options=options,
            stream=stream,
            generation=Generation(
                top_k=top_k, response_format=_output_format(obj.get("output_config"))
            ),
            user=_user(obj.get("metadata")),
        )

    def encode(self, request: GatewayRequest, done: Completion, request_id: str) -> Response:
        response = done.choices[0]
        content: list[dict[str, Any]] = []
        if response.text or not response.tool_calls:
            content.append({"type": "text", "text": response.text})
        content += tool_use_blocks(response.tool_calls)
        body = _message(request, request_id, content)
        body["stop_reason"] = _stop_reason(response)
        body["stop_sequence"] = response.stop_sequence
        body["usage"] = _usage(response.usage)
        return JSONResponse(body, headers={"x-request-id": request_id})

    async def encode_stream(
        self, request: GatewayRequest, events: AsyncIterator[Event], request_id: str
    ) -> AsyncIterator[bytes]:
        start = _message(request, request_id, [])
        start["usage"] = {"input_tokens": 0, "output_tokens": 0}
        yield sse_event("message_start", {"type": "message_start", "message": start})
        blocks = BlockStream()
        async for event in events:
            if isinstance(event, TextDelta):
                batch = event.batch
                frames = list(blocks.text(batch.text)) if batch.text else []
                for delta in batch.tool_calls:
                    frames += blocks.call(delta)
                for frame in frames:
                    yield sse_event(frame["type"], frame)
            elif isinstance(event, ChoiceDone):
                response = event.response
                for frame in blocks.finish():
                    yield sse_event(frame["type"], frame)
                yield sse_event(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {
                            "stop_reason": _stop_reason(response),
                            "stop_sequence": response.stop_sequence,
                        },
                        "usage": _usage(response.usage),
                    },
                )
        yield sse_event("message_stop", {"type": "message_stop"})

    def stream_error(self, exc: SippError) -> bytes:
        return sse_event("error", _error_body(exc))

    def error(self, exc: SippError, request_id: str) -> Response:
        return error_response(_error_body(exc), exc, request_id)


# ----------------------------------------------------------------- decoding helpers
def _number(obj: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise field_error(name, f"{name}: must be a number from {low:g} to {high:g}")
    return float(value)


def _text(content: Any, where: str) -> str:
    """A string, or the text of an array of text blocks (other block kinds are refused)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise field_error(where, f"{where}: must be a string or an array of content blocks")
    return "".join(_text_block(block, f"{where}[{j}]") for j, block in enumerate(content))


def _present(block: dict[str, Any]) -> dict[str, Any]:
    """The block's fields that are set: SDKs round-trip response blocks with their unset
    optional fields as null (`citations`, `caller`...), which mean nothing here."""
    return {k: v for k, v in block.items() if v is not None}


def _text_block(block: Any, where: str) -> str:
    if isinstance(block, dict):
        block = _present(block)
    kind = block.get("type") if isinstance(block, dict) else None
    if kind != "text" or not isinstance(block.get("text"), str):
        raise field_error(
            where, f"{where}: only text blocks are supported by this gateway (got {kind!r})"
        )
    if not set(block) <= _TEXT_BLOCK:
        extra = ", ".join(sorted(set(block) - _TEXT_BLOCK))
        raise field_error(where, f"{where}: unsupported text block fields: {extra}")
    _cache_control(block.get("cache_control"), f"{where}.cache_control")
    return str(block["text"])


def _system(raw: Any) -> tuple[ChatMessage, ...]:
    if raw is None:
        return ()
    return (ChatMessage("system", _text(raw, "system")),)


def _messages(raw: Any) -> tuple[ChatMessage, ...]:
    """Turns in order; a user turn's `tool_result` blocks become `tool` turns before the
    text it carries, an assistant turn's `tool_use` blocks its tool calls."""
    if not isinstance(raw, list) or not raw:
        raise field_error("messages", "messages: field required, a non-empty array")
    out: list[ChatMessage] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise field_error(
                "messages", f"{where}: must be an object whose role is user or assistant"
            )
        if not set(m) <= {"role", "content"}:
            raise field_error("messages", f"{where}: only role and content are supported")
        role, content = m["role"], m.get("content")
        if not isinstance(content, list):
            out.append(ChatMessage(role, _text(content, f"{where}.content")))
            continue
        texts: list[str] = []
        calls: list[ToolCall] = []
        results: list[ChatMessage] = []
        for j, block in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "tool_use" and role == "assistant":
                calls.append(_tool_use(block, at))
            elif kind == "tool_result" and role == "user":
                results.append(_tool_result(block, at))
            elif kind == "text":
                texts.append(_text_block(block, at))
            else:
                raise field_error(
                    "messages",
                    f"{at}: only text, tool_use (assistant) and tool_result (user) blocks are "
                    f"supported by this gateway (got {kind!r})",
                )
        if role == "assistant":
            out.append(ChatMessage("assistant", "".join(texts), tuple(calls)))
            continue
        out.extend(results)
        if texts or not results:
            out.append(ChatMessage("user", "".join(texts)))
    return tuple(out)


def _tool_use(block: dict[str, Any], where: str) -> ToolCall:
    block = _present(block)
    if (
        not set(block) <= {"type", "id", "name", "input", "cache_control"}
        or not isinstance(block.get("id"), str)
        or not block["id"]
        or not isinstance(block.get("name"), str)
        or not isinstance(block.get("input"), dict)
    ):
        raise field_error(
            "messages", f"{where}: a tool_use block needs id, name and an input object"
        )
    _cache_control(block.get("cache_control"), f"{where}.cache_control")
    return ToolCall(block["id"], block["name"], json.dumps(block["input"], ensure_ascii=False))


def _tool_result(block: dict[str, Any], where: str) -> ChatMessage:
    block = _present(block)
    if not set(block) <= {"type", "tool_use_id", "content", "is_error", "cache_control"}:
        extra = ", ".join(sorted(set(block) - {"type", "tool_use_id", "content", "is_error"}))
        raise field_error("messages", f"{where}: unsupported tool_result fields: {extra}")
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise field_error("messages", f"{where}.tool_use_id: a non-empty string is required")
    is_error = block.get("is_error", False)
    if not isinstance(is_error, bool):
        raise field_error("messages", f"{where}.is_error: must be a boolean")
    _cache_control(block.get("cache_control"), f"{where}.cache_control")
    text = _text(block.get("content", ""), f"{where}.content")
    # The chat formats have no error flag on a tool result: say it in the text.
    return ChatMessage("tool", f"Error: {text}" if is_error else text, tool_call_id=call_id)


def _cache_control(value: Any, where: str) -> None:
    """Accepted as the hint it is: local targets reuse a shared prompt prefix's KV on
    their own, and nothing else would change the answer."""
    if value is None:
        return
    if (
        not isinstance(value, dict)
        or value.get("type") != "ephemeral"
        or not set(value) <= {"type", "ttl"}
        or value.get("ttl", "5m") not in ("5m", "1h")
    ):
        raise field_error(where, f"{where}: must be {{'type': 'ephemeral'}} with an optional ttl")


def _thinking(value: Any) -> None:
    if value is None or value == {"type": "disabled"}:
        return
    raise field_error("thinking", "thinking: extended thinking is not supported by this gateway")


def _output_format(config: Any) -> ResponseFormat | None:
    """`output_config.format`: Anthropic's structured output (a JSON schema)."""
    if config is None:
        return None
    if not isinstance(config, dict) or not set(config) <= {"format", "effort"}:
        raise field_error("output_config", "output_config: only format is supported")
    if config.get("effort") is not None:
        raise field_error(
            "output_config", "output_config.effort: effort levels are not supported by this gateway"
        )
    fmt = config.get("format")
    if fmt is None:
        return None
    if (
        not isinstance(fmt, dict)
        or fmt.get("type") != "json_schema"
        or not isinstance(fmt.get("schema"), dict)
        or not set(fmt) <= {"type", "schema"}
    ):
        raise field_error(
            "output_config",
            "output_config.format: must be {'type': 'json_schema', 'schema': {...}}",
        )
    check_schema(fmt["schema"], "output_config", "output_config.format.schema")
    return ResponseFormat("json_schema", fmt["schema"])


def _user(metadata: Any) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or not set(metadata) <= {"user_id"}:
        raise field_error("metadata", "metadata: only user_id is supported")
    user = metadata.get("user_id")
    if user is not None and (not isinstance(user, str) or len(user) > 256):
        raise field_error(
            "metadata", "metadata.user_id: must be a string of at most 256 characters"
        )
    return user


# ----------------------------------------------------------------- encoding helpers
def _message(request: GatewayRequest, request_id: str, content: list[Any]) -> dict[str, Any]:
    return {
        "id": "msg_" + request_id,
        "type": "message",
        "role": "assistant",
        "model": request.target,
        "content": content,
        "stop_reason": None,
        "stop_sequence": None,
    }


def _stop_reason(response: SippTextResponse) -> str:
    if response.finish_reason == "stop" and response.stop_sequence is not None:
        return "stop_sequence"
    return {"length": "max_tokens", "tool_calls": "tool_use"}.get(
        response.finish_reason, "end_turn"
    )


def _usage(usage: Usage | None) -> dict[str, int]:
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    return {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}


def _error_body(exc: SippError) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(protocol.status_for(exc), "api_error")
    return {"type": "error", "error": {"type": kind, "message": protocol.encodable(exc.message)}}
