"""Loopback OpenAI-style providers for gateway tests: real HTTP on 127.0.0.1, the real
OpenAI JSON and SSE shapes, and a count of requests still being answered."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..remote.loopback import Action, Handler, LoopbackServer, Request, json_reply, sse_reply
from .test_server import Gateway, running_gateway


class CountingUpstream(LoopbackServer):
    """A loopback server that knows how many responses it is still writing: a request the
    gateway abandoned without closing its connection shows up here as a leak."""

    def __init__(self, handler: Handler) -> None:
        self.open_requests = 0
        super().__init__(handler)

    async def _respond(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, actions: list[Action]
    ) -> bool:
        self.open_requests += 1
        try:
            return await super()._respond(reader, writer, actions)
        finally:
            self.open_requests -= 1

    def calls(self, suffix: str) -> list[Request]:
        return [r for r in self.requests if r.path.endswith(suffix)]


def embeddings_reply(req: Request) -> list[Action]:
    """`/embeddings` for a string or an array of strings: one 2-d vector per input,
    whose first value is the input's index so order can be checked."""
    raw = req.json()["input"]
    inputs = [raw] if isinstance(raw, str) else raw
    data = [
        {"object": "embedding", "index": i, "embedding": [float(i), 0.5]}
        for i in range(len(inputs))
    ]
    return json_reply(
        {
            "object": "list",
            "data": data,
            "model": req.json()["model"],
            "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
        }
    )


def text_reply(req: Request, text: str = "from the provider") -> list[Action]:
    """A complete chat or completions answer, streamed when the body asks for it."""
    body = req.json()
    chat = req.path.endswith("/chat/completions")
    usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    if body.get("stream"):
        choice: dict[str, Any] = (
            {"index": 0, "delta": {"content": text}, "finish_reason": "stop"}
            if chat
            else {"index": 0, "text": text, "finish_reason": "stop"}
        )
        chunk = {"id": "c", "object": "chunk", "created": 1, "model": "m", "choices": [choice]}
        return sse_reply([_data(chunk), _data({**chunk, "choices": [], "usage": usage}), DONE])
    choice = (
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        if chat
        else {"index": 0, "text": text, "finish_reason": "stop"}
    )
    return json_reply(
        {"id": "c", "object": "x", "created": 1, "model": "m", "choices": [choice], "usage": usage}
    )


DONE = b"data: [DONE]\n\n"


def _data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def add_targets(toml: str, url: str, targets: dict[str, str], token_env: str | None) -> str:
    """`toml` plus one openai_compatible target per `name -> upstream model`."""
    for name, model in targets.items():
        toml += (
            f'\n[[targets]]\nname = "{name}"\ntype = "openai_compatible"\n'
            f'model = "{model}"\nbase_url = "{url}/v1"\n'
        )
        if token_env is not None:
            toml += f'token_env = "{token_env}"\n'
    return toml


def poll(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait (generously bounded) for `condition`; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout}s: {what}")
        time.sleep(0.05)


@contextmanager
def provider_gateway(
    model: Path,
    directory: Path,
    upstream: LoopbackServer,
    targets: dict[str, str],
    edit: Callable[[str], str] = lambda toml: toml,
    env: dict[str, str] | None = None,
) -> Iterator[Gateway]:
    """`running_gateway` with 64 KiB bodies and one openai_compatible target per
    `name -> upstream model` on `upstream`; `edit` adjusts the TOML further."""

    def configure(toml: str) -> str:
        toml = toml.replace("max_request_bytes = 4096", "max_request_bytes = 65536")
        return edit(add_targets(toml, upstream.url, targets, None))

    with running_gateway(model, directory, configure, env) as gw:
        yield gw
