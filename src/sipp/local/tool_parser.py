"""Split a local model's output into text and tool calls, as it streams.

Two formats (see `tool_plan`): `hermes` output is free text with
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in it; `generic`
output is one JSON object, `{"tool_calls": [...]}` or `{"response": "..."}`.

The Hermes parser releases text as soon as it cannot be the start of a block, and
each call as one `ToolCallDelta` (id, name and whole arguments) once its block
closes. A block that does not hold a call to one of the request's tools stays text,
so a model that writes the marker by accident loses nothing. Whitespace between the
blocks and the text is dropped: templates put newlines there that are not an answer.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Protocol

from .._types import ToolCall, ToolCallDelta

__all__ = ["GenericParser", "HermesParser", "ToolCallParser", "new_call_id"]

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


def new_call_id() -> str:
    """An id in OpenAI's shape: `call_` and 24 hex characters."""
    return "call_" + secrets.token_hex(12)


class ToolCallParser(Protocol):
    text: str  # the text released so far (outside any call)
    calls: list[ToolCall]

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Take more output; return the text now safe to release and calls completed."""
        ...

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """End of output: release whatever was held back."""
        ...


# What json.loads raises on model output: malformed JSON (JSONDecodeError, a ValueError),
# an integer past Python's 4,300-digit limit (ValueError), nesting past the recursion limit.
_UNREADABLE = (ValueError, RecursionError)


def _call_from(value: Any, names: frozenset[str]) -> tuple[str, str] | None:
    """(name, compact arguments JSON) when `value` is a call of one of `names`."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None  # a list or object for a name would not even hash
    if value["name"] not in names:
        return None
    args = value.get("arguments", {})
    if isinstance(args, str):  # some models quote the arguments object
        try:
            args = json.loads(args)
        except _UNREADABLE:
            return None
    if not isinstance(args, dict):
        return None
    return str(value["name"]), json.dumps(args, ensure_ascii=False, separators=(",", ":"))


class _Calls:
    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.text = ""
        self.calls: list[ToolCall] = []

    def _add(self, name: str, arguments: str) -> ToolCallDelta:
        call = ToolCall(new_call_id(), name, arguments)
        self.calls.append(call)
        return ToolCallDelta(len(self.calls) - 1, call.id, call.name, call.arguments)


class HermesParser(_Calls):
    def __init__(self, names: frozenset[str]) -> None:
        super().__init__(names)
        self._pending = ""
        self._inside = False
        self._after_call = False  # drop the whitespace that follows a block
        self._gap = ""  # whitespace held back before the open block

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._pending += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> tuple[str, list[ToolCallDelta]]:
        out: list[str] = []
        deltas: list[ToolCallDelta] = []
        while True:
            if self._inside:
                end = self._pending.find(CLOSE)
                if end < 0 and not final:
                    break
                body = self._pending if end < 0 else self._pending[:end]
                self._pending = "" if end < 0 else self._pending[end + len(CLOSE) :]
                self._inside = False
                delta = self._parse(body)
                if delta is not None:
                    deltas.append(delta)
                    self._after_call = True
                else:  # not a call after all: the block and the gap before it are text
                    out.append(self._text(self._gap + OPEN + body + (CLOSE if end >= 0 else "")))
                continue
            start = self._pending.find(OPEN)
            if start >= 0:
                before = self._pending[:start]
                kept = before.rstrip()
                out.append(self._text(kept))
                self._gap = before[len(kept) :]
                self._pending = self._pending[start + len(OPEN) :]
                self._inside = True
                continue
            if final:
                tail, self._pending = self._pending, ""
                out.append(self._text(tail.rstrip() if self.calls else tail))
                break
            # Hold what may still turn out to precede (or begin) a block.
            keep = _partial_suffix(self._pending, OPEN)
            ready = self._pending[: len(self._pending) - keep].rstrip()
            out.append(self._text(ready))
            self._pending = self._pending[len(ready) :]
            break
        released = "".join(out)
        self.text += released
        return released, deltas

    def _text(self, segment: str) -> str:
        if self._after_call:
            segment = segment.lstrip()
            self._after_call = not segment
        return segment

    def _parse(self, body: str) -> ToolCallDelta | None:
        try:
            value = json.loads(body)
        except _UNREADABLE:
            return None
        found = _call_from(value, self.names)
        return self._add(*found) if found is not None else None


class GenericParser(_Calls):
    """The whole output is one JSON object, so nothing is released before the end."""

    def __init__(self, names: frozenset[str]) -> None:
        super().__init__(names)
        self._buffer = ""

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buffer += text
        return "", []

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        raw, self._buffer = self._buffer, ""
        text, found = raw, []
        try:
            value = json.loads(raw)
        except _UNREADABLE:
            value = None  # cut short (max_tokens, a stop string): it stays text
        if isinstance(value, dict):
            items = value.get("tool_calls")
            if isinstance(items, list):
                found = [_call_from(item, self.names) for item in items]
            if isinstance(value.get("response"), str) and not items:
                text = value["response"]
        calls = [c for c in found if c is not None]
        if found and len(calls) == len(found):
            text = ""
        else:
            calls = []
        self.text += text
        return text, [self._add(*c) for c in calls]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
