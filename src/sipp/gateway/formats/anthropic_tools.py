"""Tools in Anthropic's Messages spelling: `tools` / `tool_choice` in, `tool_use` and
`tool_result` content blocks both ways, and the stream's content blocks out."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from ..._errors import ExecutionError, InvalidRequestError
from ..._types import FunctionTool, NamedToolChoice, ToolCall, ToolCallDelta, ToolChoice
from .base import check_schema, distinct_tools, field_error

__all__ = ["BlockStream", "tool_fields", "tool_input", "tool_use_blocks"]

_TOOL_KEYS = frozenset({"name", "description", "input_schema", "type", "cache_control", "strict"})


def tool_fields(obj: Mapping[str, Any]) -> dict[str, Any]:
    """`SippTextOptions` keyword arguments for the body's `tools` and `tool_choice`."""
    out: dict[str, Any] = {}
    raw = obj.get("tools")
    if raw is not None:
        if not isinstance(raw, list):
            raise field_error("tools", "tools: must be an array of tools")
        out["tools"] = distinct_tools([_tool(t, i) for i, t in enumerate(raw)])
    choice = obj.get("tool_choice")
    if choice is not None:
        mode, parallel = _choice(choice, out.get("tools") or ())
        if mode is not None:
            out["tool_choice"] = mode
        if parallel is not None:
            out["parallel_tool_calls"] = parallel
    return out


def tool_input(call: ToolCall) -> dict[str, Any]:
    """A call's arguments as the JSON object a `tool_use` block carries."""
    try:
        value = json.loads(call.arguments or "{}")
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ExecutionError(
            f"the target's call of {call.name!r} has arguments that are not a JSON object"
        )
    return value


def tool_use_blocks(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    return [{"type": "tool_use", "id": c.id, "name": c.name, "input": tool_input(c)} for c in calls]


class BlockStream:
    """The content blocks of a streamed message: a text block opens when text arrives, a
    `tool_use` block when a call starts; starting one closes the one before."""

    def __init__(self) -> None:
        self._index = -1
        self._open: str | None = None  # "text", or "call<i>" for tool call i
        self._started: set[int] = set()

    def text(self, text: str) -> Iterator[dict[str, Any]]:
        if self._open != "text":
            yield from self.close()
            yield self._start({"type": "text", "text": ""}, "text")
        yield self._delta({"type": "text_delta", "text": text})

    def call(self, delta: ToolCallDelta) -> Iterator[dict[str, Any]]:
        key = f"call{delta.index}"
        if self._open != key:
            if delta.index in self._started:  # its block is closed: it cannot take more
                raise ExecutionError(
                    f"the target resumed tool call {delta.index} after another began"
                )
            self._started.add(delta.index)
            yield from self.close()
            block = {
                "type": "tool_use",
                "id": delta.id or "",
                "name": delta.name or "",
                "input": {},
            }
            yield self._start(block, key)
        if delta.arguments:
            yield self._delta({"type": "input_json_delta", "partial_json": delta.arguments})

    def finish(self) -> Iterator[dict[str, Any]]:
        """Close the last block; a message that got none still holds one empty text
        block, as its non-streamed form does."""
        if self._index < 0:
            yield self._start({"type": "text", "text": ""}, "text")
        yield from self.close()

    def close(self) -> Iterator[dict[str, Any]]:
        if self._open is not None:
            self._open = None
            yield {"type": "content_block_stop", "index": self._index}

    def _start(self, block: dict[str, Any], key: str) -> dict[str, Any]:
        self._index += 1
        self._open = key
        return {"type": "content_block_start", "index": self._index, "content_block": block}

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self._index, "delta": delta}


def _tool(raw: Any, index: int) -> FunctionTool:
    where = f"tools[{index}]"
    if not isinstance(raw, dict) or raw.get("type", "custom") != "custom":
        kind = raw.get("type") if isinstance(raw, dict) else None
        raise field_error(
            "tools", f"{where}: only custom (function) tools are supported here (got {kind!r})"
        )
    if not set(raw) <= _TOOL_KEYS:
        extra = ", ".join(sorted(set(raw) - _TOOL_KEYS))
        raise field_error("tools", f"{where}: unsupported fields: {extra}")
    strict = raw.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise field_error("tools", f"{where}.strict: must be a boolean")
    if not isinstance(raw.get("input_schema"), dict):
        raise field_error("tools", f"{where}.input_schema: field required, a JSON schema object")
    check_schema(raw["input_schema"], "tools", f"{where}.input_schema")
    try:
        return FunctionTool(
            name=raw.get("name"),  # type: ignore[arg-type]  # checked by FunctionTool
            description=raw.get("description"),
            parameters=raw["input_schema"],
            strict=bool(strict),
        )
    except InvalidRequestError as exc:
        raise field_error("tools", f"{where}: {exc.message}") from None


def _choice(raw: Any, tools: tuple[FunctionTool, ...]) -> tuple[ToolChoice | None, bool | None]:
    """(tool_choice, parallel_tool_calls) from Anthropic's `tool_choice` object."""
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in ("auto", "any", "tool", "none") or not set(raw) <= {
        "type",
        "name",
        "disable_parallel_tool_use",
    }:
        raise field_error(
            "tool_choice",
            "tool_choice: must be {'type': 'auto' | 'any' | 'tool' | 'none'} "
            "(with 'name' for 'tool', optional 'disable_parallel_tool_use')",
        )
    if not tools:
        raise field_error("tool_choice", "tool_choice: needs tools")
    disable = raw.get("disable_parallel_tool_use")
    if disable is not None and not isinstance(disable, bool):
        raise field_error("tool_choice", "tool_choice.disable_parallel_tool_use: must be a boolean")
    parallel = None if disable is None else not disable
    if kind == "tool":
        name = raw.get("name")
        if not isinstance(name, str) or name not in {t.name for t in tools}:
            raise field_error("tool_choice", f"tool_choice.name: {name!r} is not one of the tools")
        return NamedToolChoice(name), parallel
    mode: ToolChoice = {"auto": "auto", "any": "required", "none": "none"}[kind]  # type: ignore[assignment]
    return mode, parallel
