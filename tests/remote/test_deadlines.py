"""Deadlines against upstreams that trickle, through both shells and both clients.

`request_s` bounds the whole request: to the last byte of a finite body, to the
first token of a stream. After the first token each SSE frame may take up to
`stream_read_s`. A byte every 0.2 s resets no per-read timer that matters.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from sipp import (
    AsyncSippClient,
    GatewayTimeoutPolicy,
    ProviderDescriptor,
    RemoteError,
)
from sipp.gateway.config import ProviderTarget
from sipp.gateway.serve import _add_provider
from sipp.gateway.upstreams.pool import Pool

from .harness import call
from .loopback import Action, Chunk, LoopbackServer, Raw, Sleep, Status
from .openai_wire import CHAT, MODES, chunk, completion

COMPLETION = json.dumps(completion("Late.")).encode()

END = [chunk({}, "stop"), b"data: [DONE]\n\n"]
SSE = {"content-type": "text/event-stream"}


def _provider(server: LoopbackServer, **timeouts: float) -> ProviderDescriptor:
    return ProviderDescriptor(
        "openai",
        "gpt-test",
        api_key="sk-test",
        base_url=server.url + "/v1",
        timeout=GatewayTimeoutPolicy(**timeouts),
    )


def _trickle(data: bytes, pause: float = 0.2, frame: type[Chunk | Raw] = Chunk) -> list[Action]:
    return [a for byte in data for a in (frame(bytes([byte])), Sleep(pause))]


def _trickled_json() -> list[Action]:
    # 25 bytes over 5 s, then the rest at once: every read waits well under any
    # per-read timeout, so only a deadline on the whole body stops it.
    head, rest = COMPLETION[:25], COMPLETION[25:]
    return [Status(200, {"content-type": "application/json"}), *_trickle(head), Chunk(rest)]


@pytest.mark.parametrize("mode", MODES)
def test_trickled_json_body_hits_the_request_deadline(mode: str) -> None:
    with LoopbackServer(lambda req: _trickled_json()) as server:
        with pytest.raises(RemoteError, match=r"request deadline \(1 s\)") as info:
            call(mode, _provider(server, request_s=1), "chat", CHAT)
    assert info.value.code == "timeout" and info.value.retryable


@pytest.mark.parametrize("mode", MODES)
def test_trickled_headers_hit_the_request_deadline(mode: str) -> None:
    # The status line itself arrives a byte at a time.
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    with LoopbackServer(lambda req: _trickle(head, frame=Raw)) as server:
        with pytest.raises(RemoteError) as info:
            call(mode, _provider(server, request_s=1), "chat", CHAT)
    assert info.value.code == "timeout"


@pytest.mark.parametrize("mode", MODES)
def test_stream_without_a_first_token_hits_the_request_deadline(mode: str) -> None:
    # Keep-alive comments every 0.2 s for 5 s, then the answer: too late.
    frames = [Status(200, SSE)]
    frames += [a for _ in range(25) for a in (Chunk(b": ping\n\n"), Sleep(0.2))]
    frames += [Chunk(chunk({"content": "late"})), *[Chunk(f) for f in END]]
    with LoopbackServer(lambda req: frames) as server:
        with pytest.raises(RemoteError, match="request deadline") as info:
            call(mode, _provider(server, request_s=1), "chat", CHAT, emit_tokens=True)
    assert info.value.code == "timeout" and info.value.partial_text == ""


@pytest.mark.parametrize("mode", MODES)
def test_stream_idle_deadline_after_the_first_token(mode: str) -> None:
    # The first token at once, then a frame that never completes, one byte per 0.2 s.
    frames = [Status(200, SSE), Chunk(chunk({"content": "first"}))]
    frames += _trickle(b"data: " + b"x" * 25)
    with LoopbackServer(lambda req: frames) as server:
        with pytest.raises(RemoteError, match="no event for 1 s") as info:
            call(
                mode,
                _provider(server, request_s=30, stream_read_s=1),
                "chat",
                CHAT,
                emit_tokens=True,
            )
    assert info.value.code == "timeout" and info.value.partial_text == "first"


@pytest.mark.parametrize("mode", MODES)
def test_a_flowing_stream_may_outlast_the_request_deadline(mode: str) -> None:
    # request_s ends at the first token: tokens every 0.2 s for 1.6 s are fine.
    frames = [Status(200, SSE)]
    frames += [a for i in range(8) for a in (Chunk(chunk({"content": f"t{i} "})), Sleep(0.2))]
    frames += [Chunk(f) for f in END]
    with LoopbackServer(lambda req: frames) as server:
        response, batches = call(
            mode,
            _provider(server, request_s=0.5, stream_read_s=1),
            "chat",
            CHAT,
            emit_tokens=True,
        )
    assert len(batches) == 8 and response.text == "".join(f"t{i} " for i in range(8))


def test_gateway_target_timeout_seconds_is_the_request_deadline() -> None:
    """`timeout_seconds` of a provider target bounds the whole upstream request."""

    async def main(url: str) -> RemoteError:
        async with AsyncSippClient() as client:
            target = ProviderTarget(
                "slow", "openai_compatible", "gpt-test", None, url + "/v1", timeout_seconds=1
            )
            # A single-upstream target is a pool of itself.
            pools = {"slow": Pool("slow", target.resilience)}
            state = SimpleNamespace(client=client, targets={}, pools=pools)
            await _add_provider(state, target, {})  # type: ignore[arg-type]
            with pytest.raises(RemoteError) as info:
                await client.chat(CHAT, endpoint=state.targets["slow"])
            return info.value

    with LoopbackServer(lambda req: _trickled_json()) as server:
        error = asyncio.run(main(server.url))
    assert error.code == "timeout"
