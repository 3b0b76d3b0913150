"""The `input` of an OpenAI Responses request as chat turns (see `openai_responses`).

Messages keep their text (developer turns are system turns); consecutive
`function_call` items join the assistant turn before them, so a response's output
fed back as it came is one assistant turn with its text and calls; each
`function_call_output` is a tool turn answering a call made earlier in the input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..._types import ChatMessage, ChatRole, ToolCall
from .base import field_error

__all__ = ["STATELESS", "chat_turns"]

STATELESS = "this gateway keeps no conversation state; send the whole conversation in 'input'"
_ROLES: dict[str, ChatRole] = {
    "user": "user",
    "assistant": "assistant",
    "system": "system",
    "developer": "system",
}
_MESSAGE_KEYS = frozenset({"type", "role", "content", "id", "status"})
_CALL_KEYS = frozenset({"type", "call_id", "name", "arguments", "id", "status"})
_OUTPUT_KEYS = frozenset({"type", "call_id", "output", "id", "status"})
_TEXT_PART_KEYS = {
    "input_text": frozenset({"type", "text"}),
    "output_text": frozenset({"type", "text", "annotations", "logprobs"}),
}


def chat_turns(raw: Any) -> tuple[ChatMessage, ...]:
    if isinstance(raw, str):
        return (ChatMessage("user", raw),)
    if not isinstance(raw, list) or not raw:
        raise field_error("input", "'input' is required: a string or a non-empty array of items")
    turns: list[ChatMessage] = []
    calls: set[str] = set()
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise field_error("input", f"{where}: must be an object")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            turns.append(_message(item, where))
        elif kind == "function_call":
            call = _function_call(item, where)
            calls.add(call.id)
            last = turns[-1] if turns else None
            if last is not None and last.role == "assistant":
                # Calls following an assistant turn (text or calls) belong to that turn.
                turns[-1] = ChatMessage("assistant", last.content, (*last.tool_calls, call))
            else:
                turns.append(ChatMessage("assistant", "", (call,)))
        elif kind == "function_call_output":
            turns.append(_function_output(item, where, calls))
        elif kind == "item_reference":
            raise field_error(
                "input", f"{where}: item_reference items are not supported: {STATELESS}"
            )
        else:
            raise field_error(
                "input", f"{where}: items of type {kind!r} are not supported by this gateway"
            )
    return tuple(turns)


def _message(item: Mapping[str, Any], where: str) -> ChatMessage:
    if not set(item) <= _MESSAGE_KEYS:
        extra = ", ".join(sorted(set(item) - _MESSAGE_KEYS))
        raise field_error("input", f"{where}: unsupported message fields: {extra}")
    role = item.get("role")
    role = _ROLES.get(role) if isinstance(role, str) else None
    if role is None:
        raise field_error("input", f"{where}.role must be user, assistant, system or developer")
    return ChatMessage(role, _content(item.get("content"), f"{where}.content"))


def _content(content: Any, where: str) -> str:
    """A string, or the text of an array of text parts (image, file and audio parts are
    refused naming their type)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise field_error("input", f"{where}: must be a string or an array of content parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        allowed = _TEXT_PART_KEYS.get(kind) if isinstance(kind, str) else None
        if allowed is None:
            raise field_error(
                "input",
                f"{where}[{j}]: {kind!r} parts are not supported by this gateway "
                "(only input_text and output_text)",
            )
        if not isinstance(part.get("text"), str) or not set(part) <= allowed:
            raise field_error(
                "input", f"{where}[{j}]: a {kind} part has a string 'text' and nothing else"
            )
        parts.append(part["text"])
    return "".join(parts)


def _function_call(item: Mapping[str, Any], where: str) -> ToolCall:
    if not set(item) <= _CALL_KEYS:
        extra = ", ".join(sorted(set(item) - _CALL_KEYS))
        raise field_error("input", f"{where}: unsupported function_call fields: {extra}")
    call_id, name, arguments = (item.get(key) for key in ("call_id", "name", "arguments"))
    if not (
        isinstance(call_id, str)
        and isinstance(name, str)
        and isinstance(arguments, str)
        and call_id
        and name
    ):
        raise field_error(
            "input", f"{where}: a function_call needs string call_id, name and arguments"
        )
    return ToolCall(call_id, name, arguments)


def _function_output(item: Mapping[str, Any], where: str, calls: set[str]) -> ChatMessage:
    if not set(item) <= _OUTPUT_KEYS:
        extra = ", ".join(sorted(set(item) - _OUTPUT_KEYS))
        raise field_error("input", f"{where}: unsupported function_call_output fields: {extra}")
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or call_id not in calls:
        raise field_error(
            "input",
            f"{where}: function_call_output answers call_id {call_id!r}, which no earlier "
            f"function_call item has ({STATELESS})",
        )
    return ChatMessage(
        "tool", _content(item.get("output"), f"{where}.output"), tool_call_id=call_id
    )
