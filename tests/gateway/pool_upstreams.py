"""Loopback OpenAI-style deployments for pool tests: each answers with its own text,
can be switched to a failure mode, and can be killed (listener closed, connections
reset) and brought back on the same port."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from ..remote.loopback import Action, Chunk, Request, Reset, Sleep, Status, json_reply
from .upstreams import CountingUpstream, text_reply


def error_reply(status: int, message: str, headers: dict[str, str] | None = None) -> list[Action]:
    return json_reply({"error": {"message": message, "type": "x", "code": None}}, status, headers)


class Deployment(CountingUpstream):
    """An upstream whose answer is `from <name>`; `mode` says how it behaves now."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.mode = "ok"
        self.times: list[float] = []  # when each request arrived (time.monotonic)
        super().__init__(self._handle)

    @property
    def text(self) -> str:
        return f"from {self.name}"

    def _handle(self, req: Request) -> list[Action]:
        self.times.append(time.monotonic())
        mode = self.mode
        if mode in ("dead", "reset"):
            return [Reset()]
        if mode == "500":
            return error_reply(500, "worker crashed")
        if mode == "429":
            return error_reply(429, "slow down", {"retry-after": "30"})
        if mode == "429once":
            self.mode = "ok"
            return error_reply(429, "slow down", {"retry-after": "1"})
        if mode in ("400", "401", "403"):
            return error_reply(int(mode), "refused")
        if mode == "context":
            return error_reply(400, "This model's maximum context length is 8 tokens")
        if mode == "slow":  # headers, then nothing for longer than any test waits
            return [Status(200, {"content-type": "text/event-stream"}), Sleep(60)]
        if mode == "late_reset":  # headers, a pause, then the connection drops
            return [Status(200, {"content-type": "text/event-stream"}), Sleep(1.0), Reset()]
        if mode == "after_first" and req.json().get("stream"):
            return _first_then_reset(req, self.text)
        return text_reply(req, self.text)

    def kill(self) -> None:
        """Stop listening and reset every request still arriving on open connections."""
        self.mode = "dead"
        asyncio.run_coroutine_threadsafe(self._stop_listening(), self._loop).result(10)

    def revive(self) -> None:
        asyncio.run_coroutine_threadsafe(self._listen_again(), self._loop).result(10)
        self.mode = "ok"

    async def _stop_listening(self) -> None:
        self._server.close()

    async def _listen_again(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)


def _first_then_reset(req: Request, text: str) -> list[Action]:
    """A stream that sends its first token and then the connection drops."""
    chat = req.path.endswith("/chat/completions")
    choice: dict[str, Any] = (
        {"index": 0, "delta": {"content": text[:4]}, "finish_reason": None}
        if chat
        else {"index": 0, "text": text[:4], "finish_reason": None}
    )
    chunk = {"id": "c", "object": "chunk", "created": 1, "model": "m", "choices": [choice]}
    frame = b"data: " + json.dumps(chunk).encode() + b"\n\n"
    return [Status(200, {"content-type": "text/event-stream"}), Chunk(frame), Reset()]


def pool_toml(name: str, deployments: dict[str, str], extra: str = "", **tables: str) -> str:
    """An openai_compatible target `name` over `deployments` (name -> base URL)."""
    out = f'\n[[targets]]\nname = "{name}"\ntype = "openai_compatible"\nmodel = "m"\n{extra}\n'
    for table, body in tables.items():
        out += f"[targets.{table}]\n{body}\n"
    for dep, url in deployments.items():
        out += f'[[targets.deployments]]\nname = "{dep}"\nbase_url = "{url}/v1"\n'
    return out
