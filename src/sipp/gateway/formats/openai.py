"""OpenAI's Chat Completions, Completions and Embeddings wire formats, so the official
`openai` client and OpenAI-compatible tools can use a Sipp gateway unchanged.

Errors use OpenAI's envelope (`{"error": {"message", "type", "param", "code"}}`)
with the gateway's statuses, so OpenAI clients raise their usual exception classes.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response

from ... import protocol
from ..._errors import InvalidRequestError, SippError, UnsupportedOperationError
from ..._types import (
    MEDIA_MARKER,
    ChatMessage,
    ChatRole,
    SippTextOptions,
    TokenLogprob,
    Usage,
    decode_image_data_url,
)
from ...protocol import load_json_object
from ..config import GatewayConfig
from ..request import (
    ChoiceDone,
    Completion,
    Event,
    GatewayRequest,
    ImageURL,
    Operation,
    TextDelta,
    UsageTotal,
)
from .base import BearerFormat, check_stops, error_response, field_error
from .openai_fields import attribution, generation
from .openai_tools import call_delta, calls_out, tool_call, tool_fields

__all__ = ["OpenAIFormat", "body_object", "openai_error"]

Kind = Literal["chat", "completion", "embeddings"]

_COMMON = frozenset(
    {
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "stream",
        "stream_options",
        "n",
        "user",
        "seed",
        "logit_bias",
        "presence_penalty",
        "frequency_penalty",
        "logprobs",
    }
)
_FIELDS: dict[Kind, frozenset[str]] = {
    "chat": _COMMON
    | {
        "messages",
        "max_completion_tokens",
        "top_logprobs",
        "response_format",
        "metadata",
        "store",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    },
    "completion": _COMMON | {"prompt"},
    "embeddings": frozenset({"model", "input", "encoding_format", "user"}),
}
_OPERATIONS: dict[Kind, Operation] = {"chat": "chat", "completion": "query", "embeddings": "embed"}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
}
_STREAM_HEADERS = {"content-type": "text/event-stream; charset=utf-8"}
MAX_STOPS = 4  # as OpenAI documents for `stop`


def openai_error(exc: SippError, request_id: str) -> JSONResponse:
    status = protocol.status_for(exc)
    body = {
        "error": {
            "message": exc.message,
            "type": _ERROR_TYPES.get(status, "server_error"),
            "param": exc.field if isinstance(exc, InvalidRequestError) else None,
            "code": exc.code,
        }
    }
    return error_response(body, exc, request_id)


class OpenAIFormat(BearerFormat):
    """`/v1/chat/completions` (`chat`), `/v1/completions` (`completion`) or
    `/v1/embeddings` (`embeddings`)."""

    stream_headers = _STREAM_HEADERS

    def __init__(self, kind: Kind) -> None:
        self._kind: Kind = kind
        self.operation = _OPERATIONS[kind]

    # ------------------------------------------------------------- decode
    def decode(self, body: bytes, headers: Headers, config: GatewayConfig) -> GatewayRequest:
        obj = body_object(body, _FIELDS[self._kind])
        target = obj["model"]
        if self._kind == "embeddings":
            inputs = _inputs(obj, config.max_embedding_inputs)
            fmt = obj.get("encoding_format", "float")
            if fmt not in ("float", "base64"):
                raise field_error("encoding_format", "'encoding_format' must be float or base64")
            return GatewayRequest(
                "embed", target, inputs=inputs, cost=len(inputs), wire={"encoding": fmt}
            )
        stream, include_usage = _stream_flags(obj)
        chat = self._kind == "chat"
        user, metadata = attribution(obj)
        gen = generation(obj, chat=chat)
        messages, image_urls = _messages(obj.get("messages")) if chat else (None, ())
        return GatewayRequest(
            "chat" if chat else "query",
            target,
            messages=messages,
            image_urls=image_urls,
            prompt=None if chat else _prompt(obj),
            options=_options(obj, chat=chat),
            stream=stream,
            include_usage=include_usage,
            generation=gen,
            cost=gen.n,
            user=user,
            metadata=metadata,
        )

    # ------------------------------------------------------------- encode
    def encode(self, request: GatewayRequest, done: Completion, request_id: str) -> Response:
        headers = {"x-request-id": request_id}
        if self._kind == "embeddings":
            return JSONResponse(_embeddings_body(request, done), headers=headers)
        chat = self._kind == "chat"
        choices = []
        for index, response in enumerate(done.choices):
            logprobs = _logprobs(response.logprobs, chat) if request.generation.logprobs else None
            choice: dict[str, Any] = {
                "index": index,
                "finish_reason": _finish(response.finish_reason),
                "logprobs": logprobs,
            }
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": response.text}
                if response.tool_calls:
                    message["content"] = response.text or None
                    message["tool_calls"] = calls_out(response.tool_calls)
                choice["message"] = message
            else:
                choice["text"] = response.text
            choices.append(choice)
        body = {
            "id": self._ident(request_id),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": request.target,
            "choices": choices,
            "usage": _usage(done.usage),
        }
        return JSONResponse(body, headers=headers)

    async def encode_stream(
        self, request: GatewayRequest, events: AsyncIterator[Event], request_id: str
    ) -> AsyncIterator[bytes]:
        chat = self._kind == "chat"
        with_logprobs = request.generation.logprobs
        head = (
            f'data: {{"id":{json.dumps(self._ident(request_id))},'
            f'"object":"{"chat.completion.chunk" if chat else "text_completion"}",'
            f'"created":{int(time.time())},"model":{json.dumps(request.target)},'
        ).encode()

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            tail = {"choices": choices} if usage is None else {"choices": choices, "usage": usage}
            return head + _dumps(tail)[1:].encode() + b"\n\n"

        def piece(index: int, text: str | None, finish: str | None, lp: Any = None) -> bytes:
            if chat:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                return chunk(
                    [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": lp}]
                )
            return chunk(
                [{"index": index, "text": text or "", "finish_reason": finish, "logprobs": lp}]
            )

        offsets: dict[int, int] = {}  # per choice: its text so far, for `text_offset`
        if chat:
            for index in range(request.generation.n):
                role = {"role": "assistant", "content": ""}
                yield chunk([{"index": index, "delta": role, "finish_reason": None}])
        async for event in events:
            if isinstance(event, TextDelta):
                batch = event.batch
                if batch.tool_calls and chat:
                    calls = [call_delta(d) for d in batch.tool_calls]
                    delta: dict[str, Any] = {"tool_calls": calls}
                    if batch.text:
                        delta["content"] = batch.text
                    yield chunk([{"index": event.index, "delta": delta, "finish_reason": None}])
                    continue
                lp = None
                if with_logprobs:
                    at = offsets.get(event.index, 0)
                    lp = _logprobs(batch.logprobs, chat, at)
                    offsets[event.index] = at + sum(len(e.token) for e in batch.logprobs)
                yield piece(event.index, batch.text, None, lp)
            elif isinstance(event, ChoiceDone):
                yield piece(event.index, None, _finish(event.response.finish_reason))
            elif isinstance(event, UsageTotal) and request.include_usage:
                yield chunk([], usage=_usage(event.usage))
        yield b"data: [DONE]\n\n"

    def stream_error(self, exc: SippError) -> bytes:
        error = {"message": exc.message, "type": "server_error", "param": None, "code": exc.code}
        return b"data: " + json.dumps(protocol.encodable({"error": error})).encode() + b"\n\n"

    def error(self, exc: SippError, request_id: str) -> Response:
        return openai_error(exc, request_id)

    def _ident(self, request_id: str) -> str:
        return ("chatcmpl-" if self._kind == "chat" else "cmpl-") + request_id


# ----------------------------------------------------------------- decoding helpers
def body_object(body: bytes, allowed: frozenset[str]) -> dict[str, Any]:
    """The body as a JSON object with only `allowed` fields and a `model`, else a 400."""
    obj = load_json_object(body)
    for key in obj:
        if key not in allowed:
            raise field_error(key, f"'{key}' is not supported by this gateway")
    if not isinstance(obj.get("model"), str) or not obj["model"]:
        raise InvalidRequestError("'model' is required (the gateway target name)")
    return obj


def _options(obj: dict[str, Any], *, chat: bool) -> SippTextOptions:
    max_tokens = (
        obj.get("max_completion_tokens", obj.get("max_tokens")) if chat else obj.get("max_tokens")
    )
    stop = obj.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise InvalidRequestError("'stop' must be a string or an array of strings")
    check_stops([stop] if isinstance(stop, str) else stop or [], "stop", MAX_STOPS, "'stop' {}")
    return SippTextOptions(
        max_tokens=max_tokens,
        temperature=obj.get("temperature"),
        top_p=obj.get("top_p"),
        stop=stop,
        **(tool_fields(obj) if chat else {}),
    )


def _content(value: Any, where: str, images: list[bytes | str] | None = None) -> str:
    """The text of `content`. With `images` (user turns), `image_url` parts are taken
    too: each becomes a media marker in the text and its bytes (or http(s) URL, for the
    gateway to fetch if the target allows) go to `images`."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if images is not None and isinstance(part, dict) and part.get("type") == "image_url":
                images.append(_image_part(part, where))
                parts.append(MEDIA_MARKER)
                continue
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kinds = "text and image_url" if images is not None else "text"
                raise InvalidRequestError(f"{where}: only {kinds} content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequestError(f"{where}: content must be a string or an array of text parts")


def _image_part(part: dict[str, Any], where: str) -> bytes | str:
    """An `image_url` part's image: the bytes of a data URL (its size checked on the
    encoded length, before anything is decoded), or an http(s) URL left for the gateway
    to fetch (only for targets that list its host; see `image_fetch`)."""
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise field_error("messages", f"{where}: image_url.url must be a string")
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        return url
    if scheme != "data":
        raise field_error(
            "messages",
            f"{where}: image_url must be a data: URL (data:image/png;base64,...) or an "
            "http(s) URL on a host the target allows",
        )
    return decode_image_data_url(url, field="messages")


def _messages(raw: Any) -> tuple[tuple[ChatMessage, ...], tuple[ImageURL, ...]]:
    if not isinstance(raw, list) or not raw:
        raise InvalidRequestError("'messages' must be a non-empty array")
    out = []
    urls: list[ImageURL] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequestError(f"{where} must be an object")
        role = m.get("role")
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise field_error("messages", f"{where}.tool_call_id must be a non-empty string")
            out.append(ChatMessage("tool", _content(m.get("content"), where), tool_call_id=call_id))
            continue
        if role == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise field_error("messages", f"{where}.tool_calls must be an array")
            content = m.get("content")
            text = "" if content is None else _content(content, where)
            tool_calls = tuple(
                tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)
            )
            out.append(ChatMessage("assistant", text, tool_calls))
            continue
        if role not in ("user", "assistant", "system", "developer"):
            raise InvalidRequestError(
                f"{where}.role must be system, developer, user, assistant or tool"
            )
        chat_role: ChatRole = "system" if role == "developer" else role
        images: list[bytes | str] = []
        text = _content(m.get("content"), where, images if role == "user" else None)
        urls += [ImageURL(len(out), j, u) for j, u in enumerate(images) if isinstance(u, str)]
        fetched_later = tuple(i for i in images if isinstance(i, bytes))
        out.append(ChatMessage(chat_role, text, images=fetched_later))
    return tuple(out), tuple(urls)


def _stream_flags(obj: dict[str, Any]) -> tuple[bool, bool]:
    """(`stream`, `stream_options.include_usage`)."""
    stream = obj.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise field_error("stream", "'stream' must be true or false")
    options = obj.get("stream_options")
    if options is None:
        return bool(stream), False
    if not isinstance(options, dict) or not set(options) <= {"include_usage"}:
        raise field_error(
            "stream_options", "'stream_options' must be an object with only 'include_usage'"
        )
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise field_error("stream_options", "'stream_options.include_usage' must be a boolean")
    return bool(stream), include_usage


def _prompt(obj: dict[str, Any]) -> str:
    prompt = obj.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequestError("'prompt' must be a string (or an array of one string)")
    return prompt


def _inputs(obj: dict[str, Any], cap: int) -> tuple[str, ...]:
    inputs = obj.get("input")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
        raise field_error("input", "'input' must be a string or an array of strings")
    if len(inputs) > cap:
        raise field_error(
            "input",
            f"'input' has {len(inputs)} items; this gateway takes at most {cap} per request "
            "([limits] max_embedding_inputs)",
        )
    return tuple(inputs)


# ----------------------------------------------------------------- encoding helpers
def _usage(usage: Usage | None) -> dict[str, int] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
    }


def _logprobs(entries: Sequence[TokenLogprob] | None, chat: bool, at: int = 0) -> dict[str, Any]:
    """Token log probabilities in the chat shape (`content` entries) or the legacy
    completions shape (parallel arrays, `text_offset` counted from `at`: where a streamed
    chunk's text starts in its choice's whole text)."""
    entries = entries or ()
    if chat:
        content = [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.bytes),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in e.top
                ],
            }
            for e in entries
        ]
        return {"content": content, "refusal": None}
    offsets = []
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }


def _finish(reason: str) -> str:
    return reason if reason in ("length", "tool_calls") else "stop"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _embeddings_body(request: GatewayRequest, done: Completion) -> dict[str, Any]:
    base64_out = request.wire.get("encoding") == "base64"
    data, tokens = [], 0
    for index, emb in enumerate(done.embeddings):
        if emb.pooling == "none":  # as llama-server refuses it
            raise UnsupportedOperationError(
                f"target {request.target!r} pools no vectors (pooling 'none'): its per-token "
                "vectors have no OpenAI embeddings form; give the target a pooling "
                "('mean', 'cls' or 'last')"
            )
        tokens += emb.usage.input_tokens if emb.usage else 0
        vector: Any = emb.values
        if base64_out:
            vector = base64.b64encode(struct.pack(f"<{len(emb.values)}f", *emb.values)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return {
        "object": "list",
        "data": data,
        "model": request.target,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
