"""OpenAI chat-completions bodies as a provider sends them, for the loopback upstreams."""

from __future__ import annotations

import json
from typing import Any

from sipp import ChatMessage

MODES = ["sync", "async"]
CHAT = [ChatMessage("user", "Say something.")]


def completion(content: str, completion_tokens: int = 1) -> dict[str, Any]:
    """A non-streamed chat completion answering `content` to a 4-token prompt."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-test",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 4,
            "completion_tokens": completion_tokens,
            "total_tokens": 4 + completion_tokens,
        },
    }


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    """One streamed `chat.completion.chunk` as an SSE frame."""
    body = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-test",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"
