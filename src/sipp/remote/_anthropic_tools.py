"""Tool calling in Anthropic's Messages wire format: `tools` with `input_schema`,
`tool_choice` objects, assistant `tool_use` blocks and user `tool_result` blocks,
and the `tool_use` blocks of a response."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .._errors import InvalidRequestError, RemoteError
from .._types import ChatMessage, FunctionTool, NamedToolChoice, SippTextOptions, ToolCall
from ._tool_calls import tool_parameters

__all__ = ["chat_messages", "response_content", "tool_fields", "tool_use_call"]

_CHOICE = {"auto": "auto", "required": "any", "none": "none"}


def tool_fields(options: SippTextOptions) -> dict[str, Any]:
    """The request fields for the options' tools (none when there are no tools)."""
    out: dict[str, Any] = {}
    if options.tools:
        out["tools"] = [_tool(tool) for tool in options.tools]
    choice = options.tool_choice
    wire: dict[str, Any] | None = None
    if isinstance(choice, NamedToolChoice):
        wire = {"type": "tool", "name": choice.name}
    elif choice is not None:
        wire = {"type": _CHOICE[choice]}
    # Anthropic has no top-level switch: the flag rides on the choice (auto by default);
    # with "none" no call is made, so there is nothing to disable.
    if options.parallel_tool_calls is False and (wire is None or wire["type"] != "none"):
        wire = {**(wire or {"type": "auto"}), "disable_parallel_tool_use": True}
    if wire is not None:
        out["tool_choice"] = wire
    return out


def _tool(tool: FunctionTool) -> dict[str, Any]:
    wire: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        wire["description"] = tool.description
    # input_schema is required; a tool without parameters takes an empty object.
    wire["input_schema"] = tool_parameters(tool) or {"type": "object", "properties": {}}
    if tool.strict:
        wire["strict"] = True
    return wire


def chat_messages(turns: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """`messages` for the non-system turns. Raises `InvalidRequestError` for a tool call
    whose arguments are not a JSON object (Anthropic takes `input` as an object)."""
    out: list[dict[str, Any]] = []
    results: list[dict[str, Any]] | None = None  # the user turn collecting tool results
    for m in turns:
        if m.role == "system":
            continue
        if m.role == "tool":
            # Anthropic wants every result of a turn's calls in the one user turn after it.
            if results is None:
                results = []
                out.append({"role": "user", "content": results})
            results.append(
                {"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content}
            )
            continue
        results = None
        if m.tool_calls:
            # An empty text block is refused by Anthropic, so none is sent.
            blocks: list[dict[str, Any]] = (
                [{"type": "text", "text": m.content}] if m.content else []
            )
            blocks += [
                {"type": "tool_use", "id": c.id, "name": c.name, "input": _input(c)}
                for c in m.tool_calls
            ]
            out.append({"role": "assistant", "content": blocks})
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def _input(call: ToolCall) -> dict[str, Any]:
    try:
        value = json.loads(call.arguments)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InvalidRequestError(
            f"tool call {call.id!r} ({call.name}): anthropic needs its arguments to be "
            "a JSON object"
        )
    return value


def tool_use_call(block: dict[str, Any], name: str) -> ToolCall:
    """The call of one `tool_use` block; `RemoteError` when malformed."""
    id, fn_name, arguments = block.get("id"), block.get("name"), block.get("input", {})
    if not (isinstance(id, str) and id and isinstance(fn_name, str) and fn_name):
        raise RemoteError(f"{name}: a tool_use block has no id or name")
    if not isinstance(arguments, dict):
        raise RemoteError(f"{name}: tool_use block {id!r} has an input that is not an object")
    return ToolCall(id, fn_name, json.dumps(arguments))


def response_content(content: Any, name: str) -> tuple[str, tuple[ToolCall, ...]]:
    """The joined text blocks and the tool calls of a response's `content`."""
    if not isinstance(content, list):
        raise RemoteError(f"{name}: the response's content is not a list")
    texts: list[str] = []
    calls: list[ToolCall] = []
    for block in content:
        if not isinstance(block, dict):
            raise RemoteError(f"{name}: a content block is not an object")
        kind = block.get("type")
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise RemoteError(f"{name}: a text block has no text")
            texts.append(block["text"])
        elif kind == "tool_use":
            calls.append(tool_use_call(block, name))
    return "".join(texts), tuple(calls)
