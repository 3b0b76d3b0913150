"""What tool calling on every provider shares: tool schemas as plain JSON, tool calls
assembled from their streamed pieces, and the finish reason of a response that
called tools. The providers' own wire shapes live in `_openai_tools` and
`_anthropic_tools`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .._errors import InvalidRequestError, RemoteError
from .._types import FinishReason, FunctionTool, ToolCall, ToolCallDelta

__all__ = ["StreamedToolCalls", "settle_finish", "tool_parameters"]

_MAX_DEPTH = 64  # deeper schemas are refused rather than risk a RecursionError


def tool_parameters(tool: FunctionTool) -> dict[str, Any] | None:
    """The tool's JSON Schema as plain JSON (a `Mapping` need not be a dict, and a value
    json cannot encode must fail here, before anything is sent, not in a worker)."""
    if tool.parameters is None:
        return None
    plain: dict[str, Any] = _plain(tool.parameters, f"tool {tool.name!r} parameters", 0)
    return plain


def _plain(value: Any, where: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise InvalidRequestError(f"{where}: nested deeper than {_MAX_DEPTH} levels")
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        raise InvalidRequestError(f"{where}: {value!r} is not a JSON number")
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidRequestError(f"{where}: key {key!r} is not a string")
            out[key] = _plain(item, where, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_plain(item, where, depth + 1) for item in value]
    raise InvalidRequestError(f"{where}: a {type(value).__name__} is not JSON")


def settle_finish(reason: FinishReason, calls: tuple[ToolCall, ...], name: str) -> FinishReason:
    """A response that called tools finishes with `tool_calls` even when the provider says
    `stop` (OpenAI does when `tool_choice` named the function), unless it was cut off;
    a response that claims tool calls must carry some."""
    if reason == "tool_calls" and not calls:
        raise RemoteError(f"{name}: the response finished for tool calls but carries none")
    return "tool_calls" if calls and reason == "stop" else reason


class StreamedToolCalls:
    """The tool calls of one streamed response, assembled from their deltas. Each call is
    keyed by the index the provider streams it under; its first delta must carry its id
    and name, later ones append argument text."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._heads: dict[int, tuple[str, str]] = {}
        self._arguments: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return len(self._heads)

    def delta(
        self, index: int, id: str | None, name: str | None, fragment: str
    ) -> ToolCallDelta | None:
        """The delta to hand on for this piece of call `index`; None when it adds nothing.
        Raises `RemoteError` for a call that does not start with its id and name, or
        that changes them."""
        head = self._heads.get(index)
        if head is None:
            if not (isinstance(id, str) and id and isinstance(name, str) and name):
                raise RemoteError(
                    f"{self.name}: tool call {index} streamed without its id and name first"
                )
            self._heads[index] = (id, name)
            self._arguments[index] = [fragment] if fragment else []
            return ToolCallDelta(index, id, name, fragment)
        # Some compatible servers repeat the id and name in every delta: that is fine.
        if (id and id != head[0]) or (name and name != head[1]):
            raise RemoteError(f"{self.name}: tool call {index} changed its id or name mid-stream")
        if not fragment:
            return None
        self._arguments[index].append(fragment)
        return ToolCallDelta(index, arguments=fragment)

    def has_arguments(self, index: int) -> bool:
        return bool(self._arguments.get(index))

    def indices(self) -> list[int]:
        return sorted(self._heads)

    def calls(self) -> tuple[ToolCall, ...]:
        """The assembled calls in index order."""
        return tuple(
            ToolCall(*self._heads[i], "".join(self._arguments[i])) for i in sorted(self._heads)
        )
