"""Every remote run ends: on close, on cancel before the upstream answers, and when the
sync queue is full. The upstream waits on an event the test sets only after checking,
so "ended before the upstream answered" is a fact, not a timing guess.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable

import pytest

from sipp import (
    AsyncSippClient,
    ClientClosedError,
    GatewayTimeoutPolicy,
    OverloadedError,
    ProviderDescriptor,
    SippClient,
)
from sipp.remote.endpoint import RemoteEndpoint
from sipp.remote.openai import OpenAIAdapter

from .loopback import (
    Action,
    LoopbackServer,
    Raw,
    Request,
    Wait,
    full_backlog_listener,
    json_reply,
)
from .openai_wire import CHAT, completion

COMPLETION = completion("Done.")


def _provider(url: str) -> ProviderDescriptor:
    return ProviderDescriptor("openai", "gpt-test", api_key="sk-test", base_url=url + "/v1")


def _held(release: threading.Event, timeout: float = 30.0) -> Callable[[Request], list[Action]]:
    """An upstream that sends nothing, not even headers, until `release` is set."""
    return lambda req: [Wait(release, timeout), *json_reply(COMPLETION)]


def _until(check: Callable[[], bool], limit: float = 15.0) -> None:
    end = time.monotonic() + limit
    while not check():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


def test_close_ends_every_queued_and_running_sync_run() -> None:
    release = threading.Event()
    # Wait at most 5 s upstream so the old behaviour (close waits for running requests)
    # fails in bounded time instead of hanging the suite.
    with LoopbackServer(_held(release, timeout=5)) as server:
        client = SippClient()
        ref = client.add("p", _provider(server.url))
        runs = [client.chat(CHAT, endpoint=ref) for _ in range(40)]  # 32 workers: 8 queue
        _until(lambda: len(server.requests) == 32)
        client.close()
        assert not release.is_set()
        end = time.monotonic() + 15
        outcomes = []
        for run in runs:
            try:
                run.result(timeout=max(0.01, end - time.monotonic()))
                outcomes.append("answered")
            except ClientClosedError:
                outcomes.append("closed")
            except TimeoutError:
                outcomes.append("hung")
        release.set()
        assert outcomes == ["closed"] * 40
        # The running requests were aborted, not left to finish: the upstream saw them go.
        _until(lambda: server.open_connections == 0)


def test_sync_cancel_before_headers_aborts_the_request() -> None:
    release = threading.Event()
    with LoopbackServer(_held(release)) as server, SippClient() as client:
        ref = client.add("p", _provider(server.url))
        run = client.chat(CHAT, endpoint=ref)
        _until(lambda: len(server.requests) == 1)
        run.cancel()
        response = run.result(timeout=10)
        assert not release.is_set()  # ended while the upstream had not answered
        assert response.finish_reason == "cancelled"
        _until(lambda: server.hangups == 1)  # the connection was closed, not abandoned
        release.set()


def test_sync_cancel_while_connecting_aborts_the_connect() -> None:
    listener, fillers = full_backlog_listener()
    host, port = listener.getsockname()
    try:
        with SippClient() as client:
            descriptor = ProviderDescriptor(
                "openai",
                "gpt-test",
                api_key="sk-test",
                base_url=f"http://{host}:{port}/v1",
                timeout=GatewayTimeoutPolicy(connect_s=30),
            )
            run = client.chat(CHAT, endpoint=client.add("p", descriptor))
            time.sleep(0.3)  # let the worker reach connect(); a cancel before it works too
            run.cancel()
            assert run.result(timeout=10).finish_reason == "cancelled"
    finally:
        for sock in [listener, *fillers]:
            sock.close()


def test_sync_queue_is_bounded_with_overloaded_error() -> None:
    release = threading.Event()
    with LoopbackServer(_held(release)) as server, SippClient() as client:
        descriptor = _provider(server.url)
        endpoint = RemoteEndpoint(
            "provider", OpenAIAdapter(descriptor), descriptor.timeout, max_workers=2, max_queued=3
        )
        ref, _ = client._registry.install("p", endpoint)  # a small pool, to fill it
        runs = [client.chat(CHAT, endpoint=ref) for _ in range(5)]
        with pytest.raises(OverloadedError, match="5 requests are running or queued") as info:
            client.chat(CHAT, endpoint=ref)
        assert info.value.code == "overloaded" and info.value.retryable
        release.set()
        assert [r.result(timeout=30).text for r in runs] == ["Done."] * 5
        # Finished runs free their places.
        assert client.chat(CHAT, endpoint=ref).result(timeout=30).text == "Done."


def test_async_cancel_before_headers_aborts_the_request() -> None:
    release = threading.Event()

    async def main(url: str) -> str:
        async with AsyncSippClient() as client:
            run = client.chat(CHAT, endpoint=await client.add("p", _provider(url)))
            while not server.requests:
                await asyncio.sleep(0.02)
            run.cancel()
            response = await asyncio.wait_for(run.result(), 10)
            assert not release.is_set()
            return response.finish_reason

    with LoopbackServer(_held(release)) as server:
        assert asyncio.run(main(server.url)) == "cancelled"
        _until(lambda: server.hangups == 1)
        release.set()


def test_async_close_ends_running_runs_with_client_closed() -> None:
    release = threading.Event()

    async def main(url: str) -> list[str]:
        client = AsyncSippClient()
        ref = await client.add("p", _provider(url))
        runs = [client.chat(CHAT, endpoint=ref) for _ in range(5)]
        while len(server.requests) < 5:
            await asyncio.sleep(0.02)
        await client.close()
        outcomes = []
        for run in runs:
            try:
                await asyncio.wait_for(run.result(), 10)
                outcomes.append("answered")
            except ClientClosedError:
                outcomes.append("closed")
        return outcomes

    with LoopbackServer(_held(release)) as server:
        assert asyncio.run(main(server.url)) == ["closed"] * 5
        assert not release.is_set()
        _until(lambda: server.open_connections == 0)
        release.set()


def test_sync_pool_drops_a_connection_the_server_closed_while_idle() -> None:
    body = json.dumps(COMPLETION).encode()
    head = (
        f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    # A complete keep-alive response, then the server closes the connection (Raw ends so).
    with LoopbackServer(lambda req: [Raw(head.encode() + body)]) as server, SippClient() as client:
        ref = client.add("p", _provider(server.url))
        assert client.chat(CHAT, endpoint=ref).result(timeout=10).text == "Done."
        _until(lambda: server.open_connections == 0)
        # The pooled connection now reads as EOF: the pool must open a new one.
        assert client.chat(CHAT, endpoint=ref).result(timeout=10).text == "Done."
    assert len(server.requests) == 2
