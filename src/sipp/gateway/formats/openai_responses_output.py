"""The output side of OpenAI's Responses API: the Response object, its output items, and
the numbered events a streamed response is made of (see `openai_responses`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..._errors import ExecutionError, SippError
from ..._types import SippTextResponse, ToolCall, ToolCallDelta
from ...protocol import encodable
from ..request import GatewayRequest
from .base import sse_event

__all__ = [
    "ResponseStream",
    "call_item",
    "error_frame",
    "message_item",
    "message_status",
    "response_object",
]


def response_object(
    request: GatewayRequest,
    request_id: str,
    created_at: int,
    output: list[dict[str, Any]],
    done: SippTextResponse | None,
) -> dict[str, Any]:
    """The Response: `done` is the finished run, None while it is still in progress. The
    request's own settings are echoed (`wire["echo"]`) so the client's model is whole."""
    status, incomplete = "in_progress", None
    if done is not None and done.finish_reason in ("length", "cancelled"):
        status = "incomplete"
        if done.finish_reason == "length":
            incomplete = {"reason": "max_output_tokens"}
    elif done is not None:
        status = "completed"
    return {
        "id": "resp_" + request_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": None,
        "incomplete_details": incomplete,
        "model": request.target,
        "output": output,
        "previous_response_id": None,
        "reasoning": None,
        "store": False,
        "truncation": "disabled",
        "usage": _usage(done) if done is not None else None,
        **request.wire["echo"],
    }


def message_item(request_id: str, index: int, text: str | None, status: str) -> dict[str, Any]:
    """A `message` output item; `text` None while it is only just opened (no parts yet)."""
    return {
        "type": "message",
        "id": f"msg_{request_id}_{index}",
        "status": status,
        "role": "assistant",
        "content": [] if text is None else [_text_part(text)],
    }


def call_item(
    request_id: str, index: int, call: ToolCall, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": f"fc_{request_id}_{index}",
        "call_id": call.id,
        "name": call.name,
        "arguments": arguments,
        "status": status,
    }


def message_status(response: SippTextResponse) -> str:
    return "incomplete" if response.finish_reason == "length" else "completed"


def error_frame(exc: SippError, sequence_number: int) -> bytes:
    return sse_event(
        "error",
        {
            "type": "error",
            "code": exc.code,
            "message": encodable(exc.message),
            "param": None,
            "sequence_number": sequence_number,
        },
    )


@dataclass
class _Open:
    """The output item being streamed: its position, its item and the text so far."""

    index: int
    item: dict[str, Any]
    pieces: list[str] = field(default_factory=list)
    key: int = -1  # a tool call's stream index

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class ResponseStream:
    """One streamed response: the output items so far and the next sequence number.

    A message item opens when text arrives and a function_call item when a call's first
    delta does; each closes when the next item opens or the run finishes, so every item
    is `added`, its deltas, then `done`, in output order, as OpenAI streams them."""

    def __init__(self, request: GatewayRequest, request_id: str, created_at: int) -> None:
        self.request, self.request_id, self.created_at = request, request_id, created_at
        self._next = 0
        self._items: list[dict[str, Any]] = []
        self._open: _Open | None = None
        self._calls: dict[int, str] = {}  # stream index -> call id, for every call opened

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, **fields, "sequence_number": self._next}
        self._next += 1
        return sse_event(kind, data)

    def start(self) -> list[bytes]:
        snapshot = response_object(self.request, self.request_id, self.created_at, [], None)
        return [
            self.event("response.created", response=snapshot),
            self.event("response.in_progress", response=snapshot),
        ]

    def delta(self, text: str, calls: Sequence[ToolCallDelta]) -> list[bytes]:
        frames: list[bytes] = []
        if text:
            if self._open is None or self._open.item["type"] != "message":
                frames += self._close("completed")
                frames += self._open_message()
            assert self._open is not None
            self._open.pieces.append(text)
            frames.append(self._text_event(self._open, "response.output_text.delta", delta=text))
        for piece in calls:
            if piece.index not in self._calls:
                if not piece.id or not piece.name:
                    raise ExecutionError(
                        f"tool call {piece.index} streamed without its id and name"
                    )
                frames += self._close("completed")
                frames += self._open_call(ToolCall(piece.id, piece.name, ""), piece.index)
            elif self._open is None or self._open.key != piece.index:
                # Providers stream one call after another; a call resumed later could not be
                # told apart from a finished one in OpenAI's event order.
                raise ExecutionError(f"tool call {piece.index} continued after the next one began")
            if piece.arguments:
                frames.append(self._arguments_delta(piece.arguments))
        return frames

    def finish(self, response: SippTextResponse) -> list[bytes]:
        """Close what is open, stream any call the deltas did not carry, then the final
        `response.completed` (or `response.incomplete`) with the whole Response."""
        finals = {call.id: call for call in response.tool_calls}
        frames = self._close(message_status(response), finals)
        streamed = set(self._calls.values())
        for call in response.tool_calls:
            if call.id not in streamed:
                frames += self._open_call(call, -1 - len(self._calls))
                if call.arguments:
                    frames.append(self._arguments_delta(call.arguments))
                frames += self._close("completed")
        if not self._items:  # nothing said, nothing called: still one (empty) message
            frames += self._open_message()
            frames += self._close(message_status(response))
        body = response_object(
            self.request, self.request_id, self.created_at, self._items, response
        )
        kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
        frames.append(self.event(kind, response=body))
        return frames

    def error(self, exc: SippError) -> bytes:
        frame = error_frame(exc, self._next)
        self._next += 1
        return frame

    # ------------------------------------------------------------- items
    def _open_message(self) -> list[bytes]:
        index = len(self._items)
        item = message_item(self.request_id, index, None, "in_progress")
        self._items.append(item)
        self._open = _Open(index, item)
        return [
            self.event("response.output_item.added", output_index=index, item=item),
            self.event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=_text_part(""),
            ),
        ]

    def _open_call(self, call: ToolCall, key: int) -> list[bytes]:
        index = len(self._items)
        item = call_item(self.request_id, index, call, "", "in_progress")
        self._items.append(item)
        self._open = _Open(index, item, key=key)
        self._calls[key] = call.id
        return [self.event("response.output_item.added", output_index=index, item=item)]

    def _close(self, status: str, finals: dict[str, ToolCall] | None = None) -> list[bytes]:
        """Finish the open item. A call's arguments are what streamed, unless the run's
        final call (`finals`, by call id) says otherwise."""
        current, self._open = self._open, None
        if current is None:
            return []
        item, index = current.item, current.index
        if item["type"] == "message":
            text = current.text
            item.update(message_item(self.request_id, index, text, status))
            return [
                self._text_event(current, "response.output_text.done", text=text),
                self.event(
                    "response.content_part.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=_text_part(text),
                ),
                self.event("response.output_item.done", output_index=index, item=item),
            ]
        final = (finals or {}).get(item["call_id"])
        item["arguments"] = final.arguments if final is not None else current.text
        item["status"] = "completed"
        return [
            self.event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=item["arguments"],
            ),
            self.event("response.output_item.done", output_index=index, item=item),
        ]

    def _text_event(self, current: _Open, kind: str, **fields: Any) -> bytes:
        return self.event(
            kind,
            item_id=current.item["id"],
            output_index=current.index,
            content_index=0,
            logprobs=[],
            **fields,
        )

    def _arguments_delta(self, fragment: str) -> bytes:
        current = self._open
        assert current is not None
        current.pieces.append(fragment)
        return self.event(
            "response.function_call_arguments.delta",
            item_id=current.item["id"],
            output_index=current.index,
            delta=fragment,
        )


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(response: SippTextResponse) -> dict[str, Any] | None:
    usage = response.usage
    if usage is None:
        return None
    # A local target reuses a shared prompt prefix's KV: OpenAI calls those cached tokens.
    cached = response.local_stats.cached_prompt_tokens if response.local_stats else 0
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }
