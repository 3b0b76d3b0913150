"""Cache keys: SHA-256 of the canonical JSON of everything that decides an answer.

A key covers the cache scope (the caller label, or "shared"), the operation, the
target, the whole prompt or message list (system prompt, earlier turns, tool calls
and results included) and every generation option. It is derived from the
`GatewayRequest` itself: every field of it, and every field of the options nested in
it, is hashed unless `IGNORED` names it as not changing what the target generates,
so a new generation option is part of the key the day it is added.

`partition_key` is the same hash without the last user message: the semantic cache
compares that message by meaning inside one partition.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from ..request import GatewayRequest

__all__ = ["IGNORED", "SHARED_SCOPE", "canonical", "exact_key", "last_user_text", "partition_key"]

SHARED_SCOPE = "shared"  # what a `scope = "shared"` target hashes instead of the caller

# GatewayRequest fields that do not change what the target generates: how the answer is
# framed for the caller (stream, include_usage, wire), what it costs the caller's rate
# limit (cost: from n or the inputs, both hashed) and attribution the target never sees.
IGNORED = frozenset({"stream", "include_usage", "cost", "wire", "user", "metadata"})


def canonical(value: Any) -> Any:
    """`value` as plain JSON data with a single spelling: dataclasses by field name (type
    named, so two option types never collide), mappings with sorted string keys, floats
    by their shortest repr (so 0.0 and -0.0 or 1 and 1.0 stay distinct, as they may
    reach the target distinctly)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {"~": type(value).__name__}
        for f in dataclasses.fields(value):
            out[f.name] = canonical(getattr(value, f.name))
        return out
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return {"~f": repr(value)} if not math.isfinite(value) else repr(value)
    if isinstance(value, (bytes, bytearray)):  # an image: its digest, not a repr 4x its size
        return {"~b": hashlib.sha256(value).hexdigest()}
    # Anything else reaching a request (e.g. an enum) is hashed by its repr, never skipped.
    return {"~r": repr(value)}


def _request_fields(req: GatewayRequest) -> dict[str, Any]:
    return {
        f.name: canonical(getattr(req, f.name))
        for f in dataclasses.fields(req)
        if f.name not in IGNORED
    }


def _digest(scope: str, fields: Mapping[str, Any]) -> str:
    data = json.dumps(
        {"scope": scope, "request": fields},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def exact_key(scope: str, req: GatewayRequest) -> str:
    """The exact-cache key of `req` for `scope` (a caller label or `SHARED_SCOPE`)."""
    return _digest(scope, _request_fields(req))


def _last_user(req: GatewayRequest) -> int | None:
    if req.messages is None:
        return None
    for i in range(len(req.messages) - 1, -1, -1):
        if req.messages[i].role == "user":
            return i
    return None


def last_user_text(req: GatewayRequest) -> str | None:
    """What the semantic cache compares by meaning: the last user message, or the prompt."""
    if req.prompt is not None:
        return req.prompt
    index = _last_user(req)
    return None if index is None else req.messages[index].content  # type: ignore[index]


def partition_key(scope: str, req: GatewayRequest) -> str:
    """The hash of everything `exact_key` covers except the last user message (or the
    prompt): two requests in one partition differ in that text alone."""
    fields = _request_fields(req)
    if req.prompt is not None:
        fields["prompt"] = None
    index = _last_user(req)
    if index is not None:
        messages = list(fields["messages"])
        messages[index] = {"~": "ChatMessage", "role": "user", "content": None}
        fields["messages"] = messages
    return _digest(scope, fields)
