"""Tool calling in OpenAI's chat-completions wire format: the request's `tools`,
`tool_choice` and `parallel_tool_calls`, the tool turns of `messages`, and the
`tool_calls` of a response or of a stream's deltas."""

from __future__ import annotations

from typing import Any

from .._errors import InvalidRequestError, RemoteError
from .._types import (
    ChatMessage,
    FunctionTool,
    NamedToolChoice,
    SippTextOptions,
    ToolCall,
    ToolCallDelta,
)
from ._tool_calls import StreamedToolCalls, tool_parameters

__all__ = ["chat_message", "response_tool_calls", "stream_tool_deltas", "tool_fields"]


def tool_fields(options: SippTextOptions) -> dict[str, Any]:
    """The request fields for the options' tools (none when there are no tools)."""
    out: dict[str, Any] = {}
    if options.tools:
        out["tools"] = [_tool(tool) for tool in options.tools]
    choice = options.tool_choice
    if isinstance(choice, NamedToolChoice):
        out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        out["tool_choice"] = choice
    if options.parallel_tool_calls is not None:
        out["parallel_tool_calls"] = options.parallel_tool_calls
    return out


def _tool(tool: FunctionTool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    parameters = tool_parameters(tool)
    if parameters is not None:
        function["parameters"] = parameters
    if tool.strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def chat_message(message: ChatMessage) -> dict[str, Any]:
    """One turn of `messages`."""
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if message.tool_calls:
        return {
            "role": "assistant",
            # OpenAI's own assistant turns that only call tools carry content null.
            "content": message.content or None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in message.tool_calls
            ],
        }
    return {"role": message.role, "content": message.content}


def response_tool_calls(message: dict[str, Any], name: str) -> tuple[ToolCall, ...]:
    """`message.tool_calls` of a chat completion; `RemoteError` when malformed."""
    raw = message.get("tool_calls")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise RemoteError(f"{name}: the response's tool_calls is not a list")
    calls = []
    for position, item in enumerate(raw):
        try:
            if not isinstance(item, dict):
                raise TypeError("not an object")
            if item.get("type", "function") != "function":
                raise TypeError(f"type {item.get('type')!r} is not function")
            function = item["function"]
            calls.append(ToolCall(item["id"], function["name"], function["arguments"]))
        except (KeyError, TypeError, InvalidRequestError) as exc:
            raise RemoteError(
                f"{name}: malformed tool call {position} in the response ({_why(exc)})"
            ) from None
    return tuple(calls)


def stream_tool_deltas(
    items: Any, calls: StreamedToolCalls, name: str
) -> tuple[ToolCallDelta, ...]:
    """The deltas carried by one chunk's `delta.tool_calls`, recorded into `calls`."""
    if not isinstance(items, list):
        raise RemoteError(f"{name}: a stream chunk's tool_calls is not a list")
    deltas = []
    for item in items:
        try:
            index = item["index"]
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise TypeError(f"index {index!r} is not a count")
            if item.get("type") not in (None, "function"):
                raise TypeError(f"type {item.get('type')!r} is not function")
            function = item.get("function") or {}
            id, fn_name, fragment = item.get("id"), function.get("name"), function.get("arguments")
            for value in (id, fn_name, fragment):
                if value is not None and not isinstance(value, str):
                    raise TypeError(f"{value!r} is not a string")
        except (KeyError, TypeError, AttributeError) as exc:
            raise RemoteError(f"{name}: malformed tool call delta ({_why(exc)})") from None
        delta = calls.delta(index, id, fn_name, fragment or "")
        if delta is not None:
            deltas.append(delta)
    return tuple(deltas)


def _why(exc: Exception) -> str:
    return f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
