"""The gateway endpoint against a loopback server speaking the Sipp gateway profile.

Every case runs through both the sync and the async client.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from typing import Any

import pytest

from sipp import (
    AsyncSippClient,
    AuthorizationError,
    ChatMessage,
    EndpointNotFoundError,
    GatewayDescriptor,
    GatewayTimeoutPolicy,
    InvalidConfigError,
    InvalidRequestError,
    LocalTextOptions,
    OverloadedError,
    PayloadTooLargeError,
    RemoteError,
    SippClient,
    SippTextOptions,
    SippTextResponse,
    TokenBatch,
)
from sipp.protocol import done_frame, error_frame, token_frame, usage_frame

from .harness import call
from .loopback import Chunk, LoopbackServer, Request, Reset, Sleep, json_reply, sse_reply

MODES = ["sync", "async"]
MESSAGES = [
    ChatMessage("system", "Answer briefly."),
    ChatMessage("user", "What does the gateway own?"),
]


def _gw(server: LoopbackServer, **kw: Any) -> GatewayDescriptor:
    return GatewayDescriptor("local", server.url, **kw)


def _tokens(*texts: str) -> list[bytes]:
    return [token_frame(TokenBatch(t, (), i)) for i, t in enumerate(texts)]


@pytest.mark.parametrize("mode", MODES)
def test_query_finite_json(mode: str) -> None:
    def handler(req: Request) -> list[Any]:
        return json_reply(
            {
                "id": "response",
                "model": "local",
                "text": "A gateway centralizes inference.",
                "finish_reason": "stop",
                "usage": {"input_tokens": 8, "output_tokens": 12, "total_tokens": 20},
            }
        )

    with LoopbackServer(handler) as server:
        response, _ = call(
            mode,
            _gw(server, authentication_kind="bearer", authentication_value="tok-1"),
            "query",
            "Explain.",
            options=SippTextOptions(max_tokens=64, temperature=0.2),
        )
        req = server.requests[0]
    assert response == SippTextResponse("A gateway centralizes inference.", "stop", response.usage)
    assert response["usage"]["total_tokens"] == 20
    assert (req.method, req.path) == ("POST", "/v1/query")
    assert req.headers["authorization"] == "Bearer tok-1"
    assert req.json() == {
        "model": "local",
        "prompt": "Explain.",
        "max_tokens": 64,
        "temperature": 0.2,
        "stream": False,
    }


@pytest.mark.parametrize("mode", MODES)
def test_chat_stream_yields_batches_usage_and_done(mode: str) -> None:
    frames = [*_tokens("Gate", "ways", " — 日本"), usage_frame_bytes(8, 3), done_frame("stop")]
    with LoopbackServer(lambda req: sse_reply(frames)) as server:
        response, batches = call(mode, _gw(server), "chat", MESSAGES, emit_tokens=True)
        body = server.requests[0].json()
    assert [b.text for b in batches] == ["Gate", "ways", " — 日本"]
    assert [b.sequence for b in batches] == [0, 1, 2]
    assert response.text == "Gateways — 日本" and response.finish_reason == "stop"
    assert response.usage.total_tokens == 11
    assert body["messages"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What does the gateway own?"},
    ]
    assert body["stream"] is True


def usage_frame_bytes(i: int, o: int) -> bytes:
    from sipp import Usage

    return usage_frame(Usage(i, o, i + o))


@pytest.mark.parametrize("mode", MODES)
def test_embed(mode: str) -> None:
    with LoopbackServer(
        lambda req: json_reply({"id": "response", "model": "local", "embedding": [0.0123, -0.0456]})
    ) as server:
        response, _ = call(
            mode, _gw(server, embed_route="/custom/embed"), "embed", "gateway inference"
        )
        req = server.requests[0]
    assert response["values"] == [0.0123, -0.0456]
    assert req.path == "/custom/embed" and req.json() == {
        "model": "local",
        "input": "gateway inference",
    }


@pytest.mark.parametrize("mode", MODES)
def test_header_auth_static_headers_options_and_value_provider(mode: str) -> None:
    counter = itertools.count(1)
    descriptor = GatewayDescriptor(
        "local",
        "http://127.0.0.1:1",
        authentication_kind="header",
        authentication_header_name="x-api-key",
        authentication_value_provider=lambda: f"short-lived-{next(counter)}",
        static_headers={"x-team": "search"},
        protocol_options={"trace": True},
        query_route="/q",
    )
    with LoopbackServer(lambda req: json_reply({"text": "ok", "finish_reason": "stop"})) as server:
        descriptor = GatewayDescriptor(**{**descriptor.__dict__, "base_url": server.url} | {})  # type: ignore[arg-type]
        for _ in range(2):
            call(mode, descriptor, "query", "hi", endpoint_options={"priority": "low"})
        reqs = server.requests
    assert [r.headers["x-api-key"] for r in reqs] == ["short-lived-1", "short-lived-2"]
    assert all(r.headers["x-team"] == "search" and r.path == "/q" for r in reqs)
    assert reqs[0].json()["trace"] is True and reqs[0].json()["priority"] == "low"


@pytest.mark.parametrize("mode", MODES)
def test_async_value_provider(mode: str) -> None:
    async def token() -> str:
        return "async-token"

    with LoopbackServer(lambda req: json_reply({"text": "ok", "finish_reason": "stop"})) as server:
        descriptor = _gw(server, authentication_kind="bearer", authentication_value_provider=token)
        if mode == "sync":
            with pytest.raises(
                InvalidConfigError, match="async value provider needs AsyncSippClient"
            ):
                call(mode, descriptor, "query", "hi")
        else:
            call(mode, descriptor, "query", "hi")
            assert server.requests[0].headers["authorization"] == "Bearer async-token"


@pytest.mark.parametrize("mode", MODES)
def test_local_options_and_overrides_are_rejected_before_sending(mode: str) -> None:
    with LoopbackServer(lambda req: json_reply({"text": "x", "finish_reason": "stop"})) as server:
        d = _gw(server)
        with pytest.raises(InvalidRequestError, match="local options"):
            call(mode, d, "query", "x", local=LocalTextOptions(context_key="k"))
        with pytest.raises(InvalidRequestError, match="provider_options"):
            call(mode, d, "chat", MESSAGES, provider_options={"reasoning_effort": "low"})
        with pytest.raises(InvalidRequestError, match="cannot override typed fields: model"):
            call(mode, d, "query", "x", endpoint_options={"model": "other"})
        with pytest.raises(InvalidRequestError, match="cannot override typed fields: max_tokens"):
            call(mode, _gw(server, protocol_options={"max_tokens": 5}), "query", "x")
        assert server.requests == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "status, code, cls",
    [
        (403, "authorization", AuthorizationError),
        (404, "not_found", EndpointNotFoundError),
        (413, "payload_too_large", PayloadTooLargeError),
        (429, "overloaded", OverloadedError),
    ],
)
def test_error_envelopes_become_typed_errors(mode: str, status: int, code: str, cls: type) -> None:
    reply = json_reply(
        {"error": {"code": code, "message": f"{code} happened"}}, status, {"x-request-id": "req-42"}
    )
    with LoopbackServer(lambda req: reply) as server, pytest.raises(cls) as info:
        call(mode, _gw(server), "query", "x")
    assert (info.value.status, info.value.request_id, info.value.message) == (
        status,
        "req-42",
        f"{code} happened",
    )


@pytest.mark.parametrize("mode", MODES)
def test_500_and_non_json_bodies(mode: str) -> None:
    html = [*json_reply({}, 500)[:1], Chunk(b"<html>oops</html>")]
    with LoopbackServer(lambda req: html) as server, pytest.raises(RemoteError) as info:
        call(mode, _gw(server), "query", "x")
    assert (info.value.status, info.value.code, info.value.retryable) == (500, "upstream", True)
    reply = [*json_reply({})[:1], Chunk(b"not json at all")]
    with (
        LoopbackServer(lambda req: reply) as server,
        pytest.raises(RemoteError, match="malformed text"),
    ):
        call(mode, _gw(server), "query", "x")


@pytest.mark.parametrize("mode", MODES)
def test_error_event_mid_stream_keeps_partial_text(mode: str) -> None:
    from sipp import ExecutionError

    frames = [*_tokens("Hello", " there"), error_frame(ExecutionError("target crashed"))]
    with (
        LoopbackServer(lambda req: sse_reply(frames)) as server,
        pytest.raises(ExecutionError) as info,
    ):
        call(mode, _gw(server), "query", "x", emit_tokens=True)
    assert info.value.message == "target crashed" and info.value.partial_text == "Hello there"


@pytest.mark.parametrize("mode", MODES)
def test_stream_without_done_event(mode: str) -> None:
    with (
        LoopbackServer(lambda req: sse_reply(_tokens("cut", " off"))) as server,
        pytest.raises(RemoteError) as info,
    ):
        call(mode, _gw(server), "query", "x", emit_tokens=True)
    assert "ended before its done event" in info.value.message
    assert info.value.retryable and info.value.partial_text == "cut off"


@pytest.mark.parametrize("mode", MODES)
def test_connection_reset_mid_stream(mode: str) -> None:
    with (
        LoopbackServer(
            lambda req: [*sse_reply(_tokens("partial")), Sleep(0.05), Reset()]
        ) as server,
        pytest.raises(RemoteError) as info,
    ):
        call(mode, _gw(server), "query", "x", emit_tokens=True)
    assert info.value.retryable and info.value.partial_text == "partial"


@pytest.mark.parametrize("mode", MODES)
def test_read_timeout_mid_stream(mode: str) -> None:
    timeout = GatewayTimeoutPolicy(stream_read_s=0.3)
    slow = [*sse_reply(_tokens("slow")), Sleep(3)]
    with LoopbackServer(lambda req: slow) as server, pytest.raises(RemoteError) as info:
        call(mode, _gw(server, timeout=timeout), "query", "x", emit_tokens=True)
    assert info.value.code == "timeout" and info.value.partial_text == "slow"


@pytest.mark.parametrize("mode", MODES)
def test_connection_refused(mode: str) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RemoteError, match="cannot connect") as info:
        call(mode, GatewayDescriptor("local", f"http://127.0.0.1:{port}"), "query", "x")
    assert info.value.retryable


@pytest.mark.parametrize("mode", MODES)
def test_connect_timeout(mode: str) -> None:
    from .loopback import full_backlog_listener

    server, fillers = full_backlog_listener()
    try:
        host, port = server.getsockname()
        d = GatewayDescriptor(
            "local", f"http://{host}:{port}", timeout=GatewayTimeoutPolicy(connect_s=0.3)
        )
        with pytest.raises(RemoteError) as info:
            call(mode, d, "query", "x")
        assert info.value.retryable
        assert info.value.code in ("timeout", "upstream")
    finally:
        for s in fillers:
            s.close()
        server.close()


@pytest.mark.parametrize("mode", MODES)
def test_cancel_mid_stream_closes_the_connection(mode: str) -> None:
    frames = [*_tokens("one"), Sleep(0.2), *[Chunk(f) for f in _tokens(*["x"] * 50)[1:]], Sleep(10)]

    with LoopbackServer(
        lambda req: [
            *sse_reply([])[:1],
            *[a if not isinstance(a, bytes) else Chunk(a) for a in frames],
        ]
    ) as server:
        d = _gw(server)
        if mode == "sync":
            with SippClient() as client:
                run = client.query("x", endpoint=client.add("g", d), emit_tokens=True)
                first = next(iter(run))
                run.cancel("user left")
                response = run.result(timeout=10)
        else:

            async def main() -> tuple[TokenBatch, SippTextResponse]:
                async with AsyncSippClient() as client:
                    run = client.query("x", endpoint=await client.add("g", d), emit_tokens=True)
                    it = run.__aiter__()
                    first = await it.__anext__()
                    run.cancel("user left")
                    return first, await asyncio.wait_for(run.result(), 10)

            first, response = asyncio.run(main())
        deadline = time.monotonic() + 5
        while server.open_connections and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.open_connections == 0
    assert first.text == "one"
    assert response.finish_reason == "cancelled" and response.text.startswith("one")


def test_descriptor_validation() -> None:
    with pytest.raises(InvalidConfigError, match="absolute http"):
        GatewayDescriptor("local", "gateway.example.com")
    with pytest.raises(InvalidConfigError, match="absolute http"):
        GatewayDescriptor("local", "ftp://x")
    with pytest.raises(InvalidConfigError, match="needs authentication_value"):
        GatewayDescriptor("local", "http://x", authentication_kind="bearer")
    with pytest.raises(InvalidConfigError, match="authentication_header_name"):
        GatewayDescriptor(
            "local", "http://x", authentication_kind="header", authentication_value="v"
        )
    with pytest.raises(InvalidConfigError, match="query_route"):
        GatewayDescriptor("local", "http://x", query_route="v1/query")
    with pytest.raises(InvalidConfigError, match="stream_read_s"):
        GatewayTimeoutPolicy(stream_read_s=0)
    assert "tok-secret" not in repr(
        GatewayDescriptor(
            "local", "http://x", authentication_kind="bearer", authentication_value="tok-secret"
        )
    )


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_thousand_requests_leak_no_connections_or_threads() -> None:
    reply = json_reply({"text": "ok", "finish_reason": "stop"})
    stream = sse_reply([*_tokens("o", "k"), done_frame("stop")])
    with LoopbackServer(lambda req: stream if req.json()["stream"] else reply) as server:
        threads_before, fds_before = threading.active_count(), _fds()
        with SippClient() as client:
            ref = client.add("g", _gw(server))
            for i in range(500):
                run = client.query("x", endpoint=ref, emit_tokens=i % 2 == 0)
                assert run.result(timeout=10).text == "ok"

        async def main() -> None:
            async with AsyncSippClient() as client:
                ref = await client.add("g", _gw(server))
                for _i in range(0, 500, 25):
                    runs = [
                        client.query("x", endpoint=ref, emit_tokens=j % 2 == 0) for j in range(25)
                    ]
                    assert [r.text for r in await asyncio.gather(*(r.result() for r in runs))] == [
                        "ok"
                    ] * 25

        asyncio.run(main())
        deadline = time.monotonic() + 5
        while (
            threading.active_count() > threads_before or server.open_connections
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(server.requests) == 1000
        assert threading.active_count() <= threads_before
        assert server.open_connections == 0
        assert _fds() <= fds_before
