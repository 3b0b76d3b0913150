"""The first-party gateway JSON profile: request bodies in, response bodies out.

Pure functions over bytes and dicts. A server decodes a body into a typed
request (target name + operation arguments), runs it with a `SippClient`,
and encodes the response; a gateway client does the reverse. Every rejected
field is named in the error, so a caller can fix its request from the message.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .._errors import InvalidRequestError, RemoteError, SippError
from .._types import (
    ChatMessage,
    SippEmbeddingResponse,
    SippTextOptions,
    SippTextResponse,
    TokenBatch,
    Usage,
    decode_image_data_url,
    not_unicode,
)
from .errors import error_body
from .sse import encode_sse

__all__ = [
    "MAX_STOPS",
    "MAX_STOP_CHARS",
    "DecodedEmbedRequest",
    "DecodedTextRequest",
    "chat_body",
    "decode_chat_body",
    "decode_embed_body",
    "decode_query_body",
    "done_frame",
    "embed_body",
    "embedding_response_body",
    "error_frame",
    "load_json_object",
    "parse_embedding_response",
    "parse_text_response",
    "query_body",
    "stop_problem",
    "text_response_body",
    "token_frame",
    "usage_frame",
]

LOCAL_ONLY_FIELDS = frozenset(
    {"context_key", "grammar", "json_schema", "sampling", "media", "normalize"}
)
_TEXT_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "stop", "stream"})
_QUERY_FIELDS = _TEXT_FIELDS | {"prompt"}
_CHAT_FIELDS = _TEXT_FIELDS | {"messages"}
_EMBED_FIELDS = frozenset({"model", "input"})
# A local engine checks every stop string against the text after every token, on the one
# thread that decodes for every request: a request may bring a few short ones, not more.
MAX_STOPS = 16
MAX_STOP_CHARS = 1000


@dataclass(frozen=True)
class DecodedTextRequest:
    target: str
    operation: Literal["query", "chat"]
    prompt: str | None
    messages: tuple[ChatMessage, ...] | None
    options: SippTextOptions
    stream: bool
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DecodedEmbedRequest:
    target: str
    input: str
    extras: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- decoding (server side)
def decode_query_body(
    body: bytes | str | Mapping[str, Any], *, extra_fields: Iterable[str] = ()
) -> DecodedTextRequest:
    """Decode a `/v1/query` body. `extra_fields` names fields your route accepts
    beyond the profile; they come back in `.extras` instead of being rejected."""
    obj = _object(body)
    extras = _check_fields(obj, _QUERY_FIELDS, extra_fields)
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise _field_error("prompt", "is required and must be a string")
    return DecodedTextRequest(
        _target(obj), "query", prompt, None, _text_options(obj), _stream(obj), extras
    )


def decode_chat_body(
    body: bytes | str | Mapping[str, Any], *, extra_fields: Iterable[str] = ()
) -> DecodedTextRequest:
    obj = _object(body)
    extras = _check_fields(obj, _CHAT_FIELDS, extra_fields)
    raw = obj.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _field_error("messages", "is required and must be a non-empty array")
    messages = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not {"role", "content"} <= set(item) <= _MESSAGE_KEYS:
            raise _field_error(
                f"messages[{i}]",
                "must be an object with exactly 'role' and 'content' (and optionally 'images')",
            )
        if item["role"] not in ("system", "user", "assistant"):
            raise _field_error(f"messages[{i}].role", "must be one of system, user, assistant")
        if not isinstance(item["content"], str):
            raise _field_error(f"messages[{i}].content", "must be a string")
        images = _images(item.get("images"), f"messages[{i}].images")
        messages.append(ChatMessage(item["role"], item["content"], images=images))
    return DecodedTextRequest(
        _target(obj), "chat", None, tuple(messages), _text_options(obj), _stream(obj), extras
    )


_MESSAGE_KEYS = frozenset({"role", "content", "images"})


def _images(raw: Any, where: str) -> tuple[bytes, ...]:
    """A message's `images`: data URLs only (a gateway reads no paths and fetches no
    URLs), each checked for size on its encoded length before it is decoded."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(u, str) for u in raw):
        raise _field_error(where, "must be an array of data: URLs")
    for url in raw:
        if url[:5].lower() != "data:":
            raise _field_error(where, "must hold data: URLs (data:image/png;base64,...)")
    return tuple(decode_image_data_url(url, field=where) for url in raw)


def decode_embed_body(
    body: bytes | str | Mapping[str, Any], *, extra_fields: Iterable[str] = ()
) -> DecodedEmbedRequest:
    obj = _object(body)
    extras = _check_fields(obj, _EMBED_FIELDS, extra_fields)
    text = obj.get("input")
    if not isinstance(text, str):
        raise _field_error("input", "is required and must be a string")
    return DecodedEmbedRequest(_target(obj), text, extras)


def _object(body: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(body, Mapping):
        return dict(body)
    return load_json_object(body)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


class _OutOfRange(ValueError):
    pass


def _out_of_range(number: str) -> _OutOfRange:
    shown = number if len(number) <= 40 else number[:37] + "..."
    return _OutOfRange(f"request body has a number out of range: {shown}")


def _finite(number: str) -> float:
    """A JSON number as a float; one past a double's range (1e400) would be infinite."""
    value = float(number)
    if not math.isfinite(value):
        raise _out_of_range(number)
    return value


def _within_float(number: str) -> int:
    """A JSON integer; one past a double's range would overflow wherever it meets a float."""
    value = int(number)
    if abs(value) > sys.float_info.max:
        raise _out_of_range(number)
    return value


# What may hide a number past a double's range: 309 digits in a row, or a 3-digit
# exponent. Only a body that has one is parsed again with the (slower) range checks.
_LONG_NUMBER = re.compile(r"[0-9]{309}|[eE][+]?0*[1-9][0-9]{2}")
_LONG_NUMBER_BYTES = re.compile(_LONG_NUMBER.pattern.encode())
# A \uD800-\uDFFF escape: a surrogate, of a pair (an emoji) or alone.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")


def load_json_object(body: bytes | str) -> dict[str, Any]:
    """A request body as a JSON object, or InvalidRequestError: strict JSON (Python's
    parser also takes NaN and Infinity, turns 1e400 into infinity, and keeps a lone
    surrogate escape as a character no UTF-8 encoder can write, none of which can be
    written back downstream), nesting within the parser's recursion limit."""
    text = isinstance(body, str)
    try:
        obj = json.loads(body, parse_constant=_not_json)
        if (_LONG_NUMBER if text else _LONG_NUMBER_BYTES).search(body):  # type: ignore[arg-type]
            obj = json.loads(
                body, parse_constant=_not_json, parse_float=_finite, parse_int=_within_float
            )
        if (_SURROGATE_ESCAPE if text else _SURROGATE_ESCAPE_BYTES).search(body):  # type: ignore[arg-type]
            json.dumps(obj, ensure_ascii=False).encode("utf-8")  # a pair joined is fine
    except UnicodeEncodeError as exc:
        raise not_unicode(exc, "request body") from None
    except _OutOfRange as exc:
        raise InvalidRequestError(str(exc)) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequestError("request body is nested too deeply") from None
    if not isinstance(obj, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return obj


def _check_fields(
    obj: Mapping[str, Any], allowed: frozenset[str], extra: Iterable[str]
) -> dict[str, Any]:
    extra_set = set(extra)
    for name in obj:
        if name in allowed or name in extra_set:
            continue
        if name in LOCAL_ONLY_FIELDS:
            raise _field_error(name, "is a local-only option; gateway requests cannot carry it")
        if name == "provider_options":
            raise _field_error(
                name, "is for direct provider endpoints; gateway requests cannot carry it"
            )
        snake = re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()
        hint = f" (did you mean '{snake}'?)" if snake != name and snake in allowed else ""
        raise _field_error(name, f"is not a known field{hint}")
    return {k: obj[k] for k in obj if k in extra_set}


def _field_error(name: str, problem: str) -> InvalidRequestError:
    return InvalidRequestError(f"field '{name}' {problem}", field=name)


def _target(obj: Mapping[str, Any]) -> str:
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise _field_error("model", "is required and must be a non-empty string (the target name)")
    return model


def _stream(obj: Mapping[str, Any]) -> bool:
    value = obj.get("stream", False)
    if not isinstance(value, bool):
        raise _field_error("stream", "must be a boolean")
    return value


def _text_options(obj: Mapping[str, Any]) -> SippTextOptions:
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise _field_error("max_tokens", "must be a positive integer")
    for name in ("temperature", "top_p"):
        value = obj.get(name)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise _field_error(name, "must be a number")
    stop = obj.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise _field_error("stop", "must be a string or an array of strings")
    problem = stop_problem([stop] if isinstance(stop, str) else stop or [])
    if problem is not None:
        raise _field_error("stop", problem)
    try:
        return SippTextOptions(
            max_tokens=max_tokens,
            temperature=obj.get("temperature"),
            top_p=obj.get("top_p"),
            stop=stop,
        )
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"field {exc.message}") from None


def stop_problem(stops: Sequence[Any], most: int = MAX_STOPS) -> str | None:
    """What makes `stops` too costly to honour (more than `most` strings, or one longer
    than `MAX_STOP_CHARS`), or None; other checks are the caller's."""
    if len(stops) > most:
        return f"holds {len(stops)} strings; at most {most} are allowed"
    longest = max((len(s) for s in stops if isinstance(s, str)), default=0)
    if longest > MAX_STOP_CHARS:
        return f"holds a string of {longest} characters; at most {MAX_STOP_CHARS} are allowed"
    return None


# ---------------------------------------------------------------- encoding (server side)
def usage_body(usage: Usage) -> dict[str, int]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
    }


def text_response_body(
    target: str, response: SippTextResponse, *, id: str = "response"
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": id,
        "model": target,
        "text": response.text,
        "finish_reason": response.finish_reason,
    }
    if response.usage is not None:
        body["usage"] = usage_body(response.usage)
    return body


def embedding_response_body(
    target: str, response: SippEmbeddingResponse, *, id: str = "response"
) -> dict[str, Any]:
    return {"id": id, "model": target, "embedding": response.values}


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def token_frame(batch: TokenBatch) -> bytes:
    return encode_sse("token", _json({"text": batch.text, "sequence": batch.sequence}))


def usage_frame(usage: Usage) -> bytes:
    return encode_sse("usage", _json(usage_body(usage)))


def done_frame(finish_reason: str) -> bytes:
    return encode_sse("done", _json({"finish_reason": finish_reason}))


def error_frame(error: SippError) -> bytes:
    return encode_sse("error", _json(error_body(error.code, error.message)))


# ---------------------------------------------------------------- client side
def query_body(
    target: str,
    prompt: str,
    options: SippTextOptions,
    *,
    stream: bool,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `/v1/query` body. `extra` (protocol/endpoint options) never overrides typed fields."""
    return _with_extra(
        {"model": target, "prompt": prompt, **options_fields(options), "stream": stream}, extra
    )


def chat_body(
    target: str,
    messages: Iterable[ChatMessage],
    options: SippTextOptions,
    *,
    stream: bool,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    msgs = [{"role": m.role, "content": m.content} for m in messages]
    return _with_extra(
        {"model": target, "messages": msgs, **options_fields(options), "stream": stream}, extra
    )


def embed_body(target: str, text: str, *, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return _with_extra({"model": target, "input": text}, extra)


def options_fields(
    options: SippTextOptions, *, max_key: str = "max_tokens", stop_key: str = "stop"
) -> dict[str, Any]:
    """The typed options that are set, as wire fields (names vary by wire format)."""
    out: dict[str, Any] = {}
    if options.max_tokens is not None:
        out[max_key] = options.max_tokens
    if options.temperature is not None:
        out["temperature"] = options.temperature
    if options.top_p is not None:
        out["top_p"] = options.top_p
    if options.stop:
        out[stop_key] = list(options.stop)
    return out


def _with_extra(body: dict[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    if extra:
        clash = sorted(set(extra) & (_QUERY_FIELDS | _CHAT_FIELDS | _EMBED_FIELDS))
        if clash:
            raise InvalidRequestError(
                f"extra options cannot override typed fields: {', '.join(clash)}"
            )
        bad = sorted(set(extra) & (LOCAL_ONLY_FIELDS | {"provider_options"}))
        if bad:
            raise InvalidRequestError(f"gateway requests cannot carry {', '.join(bad)}")
        body = {**body, **extra}
    return body


def parse_usage(obj: Any) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    try:
        return Usage(int(obj["input_tokens"]), int(obj["output_tokens"]), int(obj["total_tokens"]))
    except (KeyError, TypeError, ValueError):
        return None


def parse_text_response(body: bytes) -> SippTextResponse:
    try:
        obj = json.loads(body)
        text, reason = obj["text"], obj["finish_reason"]
        if not isinstance(text, str) or reason not in ("stop", "length", "cancelled"):
            raise ValueError("bad field types")
    except (ValueError, KeyError, TypeError) as exc:
        raise RemoteError(f"gateway sent a malformed text response: {exc}") from None
    return SippTextResponse(text, reason, parse_usage(obj.get("usage")))


def parse_embedding_response(body: bytes) -> SippEmbeddingResponse:
    try:
        obj = json.loads(body)
        values = [float(v) for v in obj["embedding"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise RemoteError(f"gateway sent a malformed embedding response: {exc}") from None
    # The wire profile carries only the vector; pooling is the target's business.
    return SippEmbeddingResponse(
        values, "unknown", False, len(values), parse_usage(obj.get("usage"))
    )
