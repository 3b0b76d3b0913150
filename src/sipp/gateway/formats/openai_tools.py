"""Function tools in OpenAI's Chat Completions spelling: `tools`, `tool_choice`,
`parallel_tool_calls`, assistant `tool_calls` and `tool` turns in, `tool_calls` out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..._errors import InvalidRequestError
from ..._types import FunctionTool, NamedToolChoice, ToolCall, ToolCallDelta, ToolChoice
from .base import check_schema, distinct_tools, field_error

__all__ = ["call_delta", "calls_out", "tool_call", "tool_fields"]


def tool_fields(obj: Mapping[str, Any]) -> dict[str, Any]:
    """`SippTextOptions` keyword arguments for the body's tools, each checked here so a
    bad one is a 400 naming its field."""
    raw = obj.get("tools")
    out: dict[str, Any] = {}
    if raw is not None:
        if not isinstance(raw, list):
            raise field_error("tools", "'tools' must be an array of function tools")
        out["tools"] = distinct_tools([_tool(t, i) for i, t in enumerate(raw)])
    choice = obj.get("tool_choice")
    if choice is not None:
        out["tool_choice"] = _choice(choice, out.get("tools") or ())
    parallel = obj.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise field_error("parallel_tool_calls", "'parallel_tool_calls' must be a boolean")
        if out.get("tools"):  # OpenAI ignores it without tools; so do we
            out["parallel_tool_calls"] = parallel
    return out


def tool_call(raw: Any, where: str) -> ToolCall:
    """An assistant turn's `tool_calls[i]`."""
    function = raw.get("function") if isinstance(raw, dict) else None
    if (
        not isinstance(function, dict)
        or raw.get("type", "function") != "function"
        or not isinstance(raw.get("id"), str)
        or not raw["id"]
        or not isinstance(function.get("name"), str)
        or not isinstance(function.get("arguments"), str)
    ):
        raise field_error(
            "messages",
            f"{where} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}} "
            "with string values",
        )
    return ToolCall(raw["id"], function["name"], function["arguments"])


def calls_out(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    """A response message's `tool_calls`."""
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def call_delta(delta: ToolCallDelta) -> dict[str, Any]:
    """A stream chunk's `delta.tool_calls[i]`: id, type and name only in a call's first."""
    function: dict[str, Any] = {"arguments": delta.arguments}
    out: dict[str, Any] = {"index": delta.index}
    if delta.id is not None:
        out["id"] = delta.id
        out["type"] = "function"
    if delta.name is not None:
        function["name"] = delta.name
    out["function"] = function
    return out


def _tool(raw: Any, index: int) -> FunctionTool:
    where = f"tools[{index}]"
    if not isinstance(raw, dict) or raw.get("type") != "function":
        kind = raw.get("type") if isinstance(raw, dict) else None
        raise field_error(
            "tools", f"{where}: only function tools are supported by this gateway (got {kind!r})"
        )
    function = raw.get("function")
    if not isinstance(function, dict) or not set(function) <= {
        "name",
        "description",
        "parameters",
        "strict",
    }:
        raise field_error(
            "tools",
            f"{where}.function must be an object with name and optionally description, "
            "parameters and strict",
        )
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise field_error("tools", f"{where}.function.strict must be a boolean")
    check_schema(function.get("parameters"), "tools", f"{where}.function.parameters")
    try:
        return FunctionTool(
            name=function.get("name"),  # type: ignore[arg-type]  # checked by FunctionTool
            description=function.get("description"),
            parameters=function.get("parameters"),
            strict=bool(strict),
        )
    except InvalidRequestError as exc:
        raise field_error("tools", f"{where}: {exc.message}") from None


def _choice(raw: Any, tools: tuple[FunctionTool, ...]) -> ToolChoice:
    if not tools:
        raise field_error("tool_choice", "'tool_choice' needs 'tools'")
    if raw in ("auto", "none", "required"):
        return raw  # type: ignore[no-any-return]
    function = raw.get("function") if isinstance(raw, dict) else None
    if (
        not isinstance(function, dict)
        or raw.get("type") != "function"
        or not isinstance(function.get("name"), str)
    ):
        raise field_error(
            "tool_choice",
            "'tool_choice' must be 'auto', 'none', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}",
        )
    if function["name"] not in {t.name for t in tools}:
        raise field_error(
            "tool_choice", f"'tool_choice' names {function['name']!r}, which is not in 'tools'"
        )
    return NamedToolChoice(function["name"])
