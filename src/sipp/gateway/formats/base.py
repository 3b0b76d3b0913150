"""What a wire format supplies to the request pipeline, and helpers every format shares."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response

from ... import protocol
from ..._errors import InvalidRequestError, SippError
from ..._types import FunctionTool
from ..config import GatewayConfig
from ..request import Completion, Event, GatewayRequest, Operation

__all__ = [
    "EVENT_STREAM_HEADERS",
    "MAX_SCHEMA_DEPTH",
    "BearerFormat",
    "WireFormat",
    "bearer",
    "check_schema",
    "check_stops",
    "error_headers",
    "error_response",
    "field_error",
    "sse_event",
]


class WireFormat(Protocol):
    """One public route's wire format. It never sees policy (limits, targets, admission):
    the pipeline in `call.py` runs those between `decode` and `encode`."""

    @property
    def operation(self) -> Operation:
        """What the route does, for metrics before its body is read."""
        ...

    @property
    def stream_headers(self) -> Mapping[str, str]: ...

    def credential(self, headers: Headers) -> str | None:
        """The caller's `Authorization` value (`Bearer <token>`), however the format carries it."""
        ...

    def decode(self, body: bytes, headers: Headers, config: GatewayConfig) -> GatewayRequest:
        """The whole request, validated; raises `InvalidRequestError` (naming the field)
        otherwise."""
        ...

    def encode(self, request: GatewayRequest, done: Completion, request_id: str) -> Response: ...

    def encode_stream(
        self, request: GatewayRequest, events: AsyncIterator[Event], request_id: str
    ) -> AsyncIterator[bytes]:
        """The stream's frames. A failure raised by `events` propagates; the pipeline
        turns it into `stream_error`'s frame."""
        ...

    def stream_error(self, exc: SippError) -> bytes: ...

    def error(self, exc: SippError, request_id: str) -> Response: ...


class BearerFormat:
    """What most formats share: the caller's token arrives as `Authorization: Bearer`."""

    operation: Operation
    stream_headers: Mapping[str, str]

    def credential(self, headers: Headers) -> str | None:
        return bearer(headers)


def field_error(name: str, message: str) -> InvalidRequestError:
    """A 400 that names the offending field (`param` in OpenAI's envelope)."""
    return InvalidRequestError(message, field=name)


# Named-event SSE streams (Anthropic's, the Responses API's): no caching on the way.
EVENT_STREAM_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache"}
MAX_SCHEMA_DEPTH = 64  # JSON Schemas nest far less; grammar builders recurse per level


def distinct_tools(tools: Sequence[FunctionTool]) -> tuple[FunctionTool, ...] | None:
    """`tools` as the library takes them (None when empty), or the 400 naming a repeated
    name: a model's call names its tool, so two tools of one name make a call ambiguous."""
    seen: set[str] = set()
    for tool in tools:
        if tool.name in seen:
            raise field_error("tools", f"tools: the name {tool.name!r} is used twice")
        seen.add(tool.name)
    return tuple(tools) or None


def check_schema(schema: Any, field: str, where: str) -> None:
    """Refuse a JSON Schema nested deeper than `MAX_SCHEMA_DEPTH` (400 naming `field`)."""
    level = [schema]
    for _ in range(MAX_SCHEMA_DEPTH + 1):
        level = [
            child
            for node in level
            if isinstance(node, (dict, list))
            for child in (node.values() if isinstance(node, dict) else node)
        ]
        if not level:
            return
    raise field_error(field, f"{where} is nested more than {MAX_SCHEMA_DEPTH} levels deep")


def sse_event(name: str, data: Mapping[str, Any]) -> bytes:
    """One SSE frame with an event name (Anthropic's and the Responses API's style)."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {name}\ndata: {payload}\n\n".encode()


def bearer(headers: Headers) -> str | None:
    return headers.get("authorization")


def check_stops(stops: Sequence[Any], name: str, most: int, problem: str) -> None:
    """Refuse more than `most` stop strings, or one too long, with a 400 naming `name`;
    `problem` is the format's message with `{}` where the reason goes."""
    reason = protocol.stop_problem(stops, most)
    if reason is not None:
        raise field_error(name, problem.format(reason))


def error_response(body: Mapping[str, Any], exc: SippError, request_id: str) -> JSONResponse:
    """`exc`'s error `body` with its status and headers. Its strings are made encodable
    first: a message may echo anything the client sent, and one that cannot be encoded
    would fail inside the error handler itself."""
    return JSONResponse(
        protocol.encodable(dict(body)),
        status_code=protocol.status_for(exc),
        headers=error_headers(exc, request_id),
    )


def error_headers(exc: SippError, request_id: str) -> dict[str, str]:
    """`x-request-id`, plus `Retry-After` when the refusal says how long to wait."""
    headers = {"x-request-id": request_id}
    if exc.retry_after is not None:
        headers["retry-after"] = str(math.ceil(exc.retry_after))
    return headers
