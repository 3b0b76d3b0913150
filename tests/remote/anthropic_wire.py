"""Anthropic Messages bodies and stream events as the API sends them, for the loopback
upstreams."""

from __future__ import annotations

import json
from typing import Any


def event(name: str, obj: dict[str, Any]) -> bytes:
    """One named SSE event."""
    return f"event: {name}\ndata: {json.dumps(obj)}\n\n".encode()


def message(
    content: list[dict[str, Any]],
    stop_reason: str = "end_turn",
    output_tokens: int = 4,
    stop_sequence: str | None = None,
) -> dict[str, Any]:
    """A non-streamed Messages response to a 10-token prompt."""
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": {"input_tokens": 10, "output_tokens": output_tokens},
    }


def message_start(input_tokens: int = 25) -> bytes:
    return event(
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": "claude-test",
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": 1},
            },
        },
    )


def block_start(index: int, block: dict[str, Any]) -> bytes:
    return event(
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": block},
    )


def block_delta(index: int, delta: dict[str, Any]) -> bytes:
    return event(
        "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
    )


def block_stop(index: int) -> bytes:
    return event("content_block_stop", {"type": "content_block_stop", "index": index})


def message_end(
    stop_reason: str, output_tokens: int, stop_sequence: str | None = None
) -> list[bytes]:
    """`message_delta` with the stop reason and usage, then `message_stop`."""
    return [
        event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": {"output_tokens": output_tokens},
            },
        ),
        event("message_stop", {"type": "message_stop"}),
    ]
