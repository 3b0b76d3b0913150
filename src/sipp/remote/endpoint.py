"""`RemoteEndpoint`: the sync and async shells that move bytes for an adapter.

Sync callers: each request runs on a bounded thread pool (with a bounded queue)
with one pooled `httpx.Client` over an abortable transport: `cancel()` or
`close()` shuts the request's socket down from the caller's thread, whether it
is connecting, waiting for headers or reading. Async callers: each request is
a task on the caller's loop with an `aiohttp.ClientSession` for that loop (its
connection pool costs far less per request than httpx's under concurrency,
which is the gateway's hot path; see BENCHMARKS.md); `cancel()` cancels the task.
Both send the same `Accept-Encoding`, hand raw bytes to the exchange (which
decodes them) and enforce the same deadlines (`GatewayTimeoutPolicy`).
Either way the response is always closed and the channel always finishes.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import aiohttp
import httpx

from .._channel import RunChannel
from .._descriptors import EndpointKind, GatewayTimeoutPolicy
from .._endpoint import EmbedRequest, Endpoint, Operation, TextRequest
from .._errors import (
    ClientClosedError,
    InvalidConfigError,
    OverloadedError,
    RemoteError,
    SippError,
)
from .._types import SippEmbeddingResponse, SippTextResponse
from ..protocol.sse import MAX_EVENT_BYTES
from ._abortable import Attempt, abortable_transport
from ._content import ACCEPT_ENCODING
from ._exchange import Adapter, EmbedExchange, TextExchange

__all__ = ["RemoteEndpoint"]

_Exchange = TextExchange | EmbedExchange
_Build = Callable[[dict[str, str]], httpx.Request]  # request from per-call auth headers


class RemoteEndpoint(Endpoint):
    def __init__(
        self,
        kind: EndpointKind,
        adapter: Adapter,
        timeouts: GatewayTimeoutPolicy,
        *,
        max_workers: int = 32,
        max_queued: int = 256,
    ) -> None:
        self.kind = kind
        self.adapter = adapter
        self.timeouts = timeouts
        self.max_event_bytes = max_event_bytes_from(os.environ)
        # Per-call timeouts are the fallbacks; the exchange's deadline bounds each call.
        self._client = httpx.Client(
            timeout=httpx.Timeout(
                connect=timeouts.connect_s,
                read=timeouts.stream_read_s,
                write=timeouts.request_s,
                pool=timeouts.connect_s,
            ),
            transport=abortable_transport(max_workers),
        )
        self._async_clients: dict[int, tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession]] = {}
        self._tasks: dict[asyncio.Task[None], _Exchange] = {}
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix=f"sipp-{kind}")
        self._max_pending = max_workers + max_queued
        self._jobs: dict[_Job, Future[None]] = {}  # submitted and not finished
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def with_policy(
        cls, kind: EndpointKind, adapter: Adapter, policy: GatewayTimeoutPolicy
    ) -> RemoteEndpoint:
        """An endpoint whose deadlines come from a descriptor's `GatewayTimeoutPolicy`."""
        return cls(kind, adapter, policy)

    # -- Endpoint protocol ----------------------------------------------------------
    def supports(self, operation: Operation) -> bool:
        return self.adapter.supports(operation)

    def supports_tools(self) -> bool:
        return self.adapter.supports_tools()

    def start_text(self, request: TextRequest, channel: RunChannel[SippTextResponse]) -> None:
        self._submit(*self._text(request, channel))

    def start_embed(
        self, request: EmbedRequest, channel: RunChannel[SippEmbeddingResponse]
    ) -> None:
        self._submit(*self._embed(request, channel))

    def start_text_async(self, request: TextRequest, channel: RunChannel[SippTextResponse]) -> None:
        self._spawn(*self._text(request, channel))

    def start_embed_async(
        self, request: EmbedRequest, channel: RunChannel[SippEmbeddingResponse]
    ) -> None:
        self._spawn(*self._embed(request, channel))

    def _text(
        self, request: TextRequest, channel: RunChannel[SippTextResponse]
    ) -> tuple[_Build, _Exchange]:
        self.adapter.check_text(request)
        exchange = TextExchange(
            self.adapter, channel, request.emit_tokens, self.timeouts, self.max_event_bytes
        )
        return (lambda headers: self.adapter.text_request(request, headers)), exchange

    def _embed(
        self, request: EmbedRequest, channel: RunChannel[SippEmbeddingResponse]
    ) -> tuple[_Build, _Exchange]:
        self.adapter.check_embed(request)
        exchange = EmbedExchange(self.adapter, channel, self.timeouts)
        return (lambda headers: self.adapter.embed_request(request, headers)), exchange

    def runtime_metrics(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Every run ends: queued ones and those in flight with `ClientClosedError`."""
        with self._lock:
            self._closed = True
            clients, self._async_clients = list(self._async_clients.values()), {}
            jobs = list(self._jobs.items())
        for job, future in jobs:
            # First outcome wins: the worker's later one is dropped.
            job.exchange.fail(ClientClosedError("the endpoint was closed"))
            job.attempt.abort()
            future.cancel()
        self._pool.shutdown(wait=True)
        self._client.close()
        for loop, client in clients:
            if loop.is_closed():
                continue
            if _running_loop() is loop:
                self._end_tasks(loop)
                loop.create_task(client.close())
            else:
                loop.call_soon_threadsafe(self._end_tasks, loop)
                asyncio.run_coroutine_threadsafe(client.close(), loop)

    async def aclose(self) -> None:
        """Close this loop's async client in place, then everything else."""
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._async_clients.pop(id(loop), None)
        self._end_tasks(loop)
        if entry is not None:
            await entry[1].close()
        await asyncio.to_thread(self.close)

    # -- sync shell -----------------------------------------------------------------
    def _submit(self, build: _Build, exchange: _Exchange) -> None:
        job = _Job(build, exchange)
        with self._lock:
            if self._closed:
                raise ClientClosedError("the endpoint is closed")
            if len(self._jobs) >= self._max_pending:
                raise OverloadedError(
                    f"{self.adapter.name}: {len(self._jobs)} requests are running or queued; "
                    "retry later"
                )
            self._jobs[job] = self._pool.submit(self._run_sync, job)
        exchange.channel.on_cancel(job.attempt.abort)

    def _run_sync(self, job: _Job) -> None:
        try:
            with job.attempt:
                self._exchange_sync(job.build, job.exchange)
        finally:
            with self._lock:
                self._jobs.pop(job, None)

    def _exchange_sync(self, build: _Build, exchange: _Exchange) -> None:
        channel = exchange.channel
        response: httpx.Response | None = None
        try:
            exchange.begin(time.monotonic)
            value = self.adapter.auth_value()
            if inspect.isawaitable(value):
                if inspect.iscoroutine(value):
                    value.close()  # never started: close it rather than leak a warning
                raise InvalidConfigError("an async value provider needs AsyncSippClient")
            request = self._request(build, value)
            response = self._client.send(request, stream=True)
            exchange.start(response.status_code, response.headers)
            for chunk in response.iter_raw():
                if exchange.feed(chunk) or channel.cancelled.is_set():
                    break
            if channel.cancelled.is_set() and not exchange.finished:
                exchange.cancelled()
            else:
                exchange.end()
        except BaseException as exc:
            if channel.cancelled.is_set():
                exchange.cancelled()
            elif isinstance(exc, httpx.TimeoutException) and time.monotonic() >= exchange.deadline:
                exchange.fail(exchange.timeout_error())
            else:
                exchange.fail(_as_sipp_error(exc, self.adapter.name))
        finally:
            if response is not None:
                response.close()

    def _request(self, build: _Build, auth_value: str | None) -> httpx.Request:
        request = build(self.adapter.headers_for(auth_value))
        # Both shells ask for the codings the exchange decodes, and only those.
        request.headers["accept-encoding"] = ACCEPT_ENCODING
        return request

    # -- async shell ----------------------------------------------------------------
    def _spawn(self, build: _Build, exchange: _Exchange) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._closed:
                raise ClientClosedError("the endpoint is closed")
            entry = self._async_clients.get(id(loop))
            if entry is None or entry[0] is not loop:
                t = self.timeouts
                timeout = aiohttp.ClientTimeout(
                    total=None, sock_connect=t.connect_s, sock_read=t.stream_read_s
                )
                entry = (loop, aiohttp.ClientSession(timeout=timeout, auto_decompress=False))
                self._async_clients[id(loop)] = entry
        task = loop.create_task(self._run_async(entry[1], build, exchange))
        self._tasks[task] = exchange
        task.add_done_callback(self._tasks.pop)

        def cancel_task() -> None:
            loop.call_soon_threadsafe(task.cancel)

        exchange.channel.on_cancel(cancel_task)

    def _end_tasks(self, loop: asyncio.AbstractEventLoop) -> None:
        """On `loop`: end its runs with `ClientClosedError`, then stop their tasks."""
        for task, exchange in list(self._tasks.items()):
            if task.get_loop() is loop:
                exchange.fail(ClientClosedError("the endpoint was closed"))
                task.cancel()

    async def _run_async(
        self,
        session: aiohttp.ClientSession,
        build: _Build,
        exchange: _Exchange,
    ) -> None:
        response: aiohttp.ClientResponse | None = None
        loop = asyncio.get_running_loop()
        exchange.begin(loop.time)
        deadline = _AsyncDeadline(loop, exchange)
        try:
            value = self.adapter.auth_value()
            if inspect.isawaitable(value):
                value = await value
            request = self._request(build, value)
            headers = {
                k: v for k, v in request.headers.items() if k not in ("host", "content-length")
            }
            response = await session.request(
                request.method, str(request.url), headers=headers, data=request.content
            )
            exchange.start(response.status, httpx.Headers(list(response.headers.items())))
            async for chunk in response.content.iter_any():
                if exchange.feed(chunk):
                    break
                deadline.follow()
            exchange.end()
        except asyncio.CancelledError:
            if deadline.expired:
                exchange.fail(exchange.timeout_error())
            else:
                exchange.cancelled()
        except BaseException as exc:
            exchange.fail(_as_sipp_error(exc, self.adapter.name))
        finally:
            deadline.disarm()
            if response is not None:
                response.release()  # back to the pool if fully read, else the connection closes


class _Job:
    __slots__ = ("attempt", "build", "exchange")

    def __init__(self, build: _Build, exchange: _Exchange) -> None:
        self.build = build
        self.exchange = exchange
        self.attempt = Attempt(lambda: exchange.deadline)


class _AsyncDeadline:
    """Cancels the current task once `exchange.deadline` (on the loop's clock) passes.

    One timer at a time. A stream moves the deadline forward on every frame; the timer
    then fires early and re-arms for the new one, so a frame costs no timer churn. Only
    a deadline moved earlier (request_s -> stream_read_s at the first token) re-arms
    at once (`follow`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, exchange: _Exchange) -> None:
        self._loop = loop
        self._exchange = exchange
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self.expired = False
        self._handle: asyncio.TimerHandle | None = None
        self._arm()

    def follow(self) -> None:
        if self._handle is not None and self._exchange.deadline < self._handle.when():
            self._handle.cancel()
            self._arm()

    def _arm(self) -> None:
        self._handle = self._loop.call_at(self._exchange.deadline, self._fire)

    def _fire(self) -> None:
        if self._loop.time() < self._exchange.deadline:
            self._arm()
            return
        self._handle = None
        self.expired = True
        self._task.cancel()

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def max_event_bytes_from(env: Mapping[str, str]) -> int:
    """The cap on one streamed server-sent event: `SIPP_SSE_MAX_EVENT_BYTES`, else 1 MiB."""
    raw = env.get("SIPP_SSE_MAX_EVENT_BYTES")
    if raw is None:
        return MAX_EVENT_BYTES
    value = int(raw) if raw.strip().isdigit() else 0
    if value <= 0:
        raise InvalidConfigError("SIPP_SSE_MAX_EVENT_BYTES must be a positive number of bytes")
    return value


def _aiohttp_error(exc: BaseException, name: str) -> SippError:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return RemoteError(f"{name}: connect timed out", retryable=True, code="timeout")
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
        return RemoteError(
            f"{name}: timed out waiting for the response", retryable=True, code="timeout"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return RemoteError(f"{name}: cannot connect ({exc})", retryable=True)
    return RemoteError(
        f"{name}: connection failed mid-response ({type(exc).__name__}: {exc})", retryable=True
    )


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _as_sipp_error(exc: BaseException, name: str) -> SippError:
    if isinstance(exc, SippError):
        return exc
    if isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError):
        return _aiohttp_error(exc, name)
    if isinstance(exc, httpx.ConnectTimeout):
        return RemoteError(f"{name}: connect timed out", retryable=True, code="timeout")
    if isinstance(exc, httpx.TimeoutException):
        return RemoteError(
            f"{name}: timed out waiting for the response ({type(exc).__name__})",
            retryable=True,
            code="timeout",
        )
    if isinstance(exc, httpx.ConnectError):
        return RemoteError(f"{name}: cannot connect ({exc})", retryable=True)
    if isinstance(exc, httpx.TransportError):
        return RemoteError(
            f"{name}: connection failed mid-response ({type(exc).__name__}: {exc})", retryable=True
        )
    return RemoteError(f"{name}: {type(exc).__name__}: {exc}")
