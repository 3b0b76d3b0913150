"""`RemoteEndpoint`: the sync and async shells that move bytes for an adapter.

Sync callers: each request runs on a bounded thread pool with one pooled
`httpx.Client`; `cancel()` closes the response from the caller's thread, which
unblocks the reader. Async callers: each request is a task on the caller's
loop with an `aiohttp.ClientSession` for that loop (its connection pool costs
far less per request than httpx's under concurrency, which is the gateway's hot
path; see BENCHMARKS.md); `cancel()` cancels the task.
Either way the response is always closed and the channel always finishes.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import httpx

from .._channel import RunChannel
from .._descriptors import EndpointKind, GatewayTimeoutPolicy
from .._endpoint import EmbedRequest, Endpoint, Operation, TextRequest
from .._errors import ClientClosedError, InvalidConfigError, RemoteError, SippError
from .._types import SippEmbeddingResponse, SippTextResponse
from ._exchange import Adapter, EmbedExchange, TextExchange

__all__ = ["RemoteEndpoint"]

_Exchange = TextExchange | EmbedExchange
_Build = Callable[[dict[str, str]], httpx.Request]  # request from per-call auth headers


class RemoteEndpoint(Endpoint):
    def __init__(
        self,
        kind: EndpointKind,
        adapter: Adapter,
        timeout: httpx.Timeout,
        *,
        max_workers: int = 32,
    ) -> None:
        self.kind = kind
        self.adapter = adapter
        self._timeout = timeout
        self._client = httpx.Client(timeout=timeout)
        self._async_clients: dict[int, tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession]] = {}
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix=f"sipp-{kind}")
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def with_policy(
        cls, kind: EndpointKind, adapter: Adapter, policy: GatewayTimeoutPolicy
    ) -> RemoteEndpoint:
        """An endpoint whose deadlines come from a descriptor's `GatewayTimeoutPolicy`."""
        timeout = httpx.Timeout(
            connect=policy.connect_s,
            read=policy.stream_read_s,
            write=policy.request_s,
            pool=policy.connect_s,
        )
        return cls(kind, adapter, timeout)

    # -- Endpoint protocol ----------------------------------------------------------
    def supports(self, operation: Operation) -> bool:
        return self.adapter.supports(operation)

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
        exchange = TextExchange(self.adapter, channel, stream=request.emit_tokens)
        return (lambda headers: self.adapter.text_request(request, headers)), exchange

    def _embed(
        self, request: EmbedRequest, channel: RunChannel[SippEmbeddingResponse]
    ) -> tuple[_Build, _Exchange]:
        self.adapter.check_embed(request)
        exchange = EmbedExchange(self.adapter, channel)
        return (lambda headers: self.adapter.embed_request(request, headers)), exchange

    def runtime_metrics(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients, self._async_clients = list(self._async_clients.values()), {}
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()
        for loop, client in clients:
            if loop.is_closed():
                continue
            if _running_loop() is loop:
                loop.create_task(client.close())
            else:
                asyncio.run_coroutine_threadsafe(client.close(), loop)

    async def aclose(self) -> None:
        """Close this loop's async client in place, then everything else."""
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._async_clients.pop(id(loop), None)
        if entry is not None:
            await entry[1].close()
        await asyncio.to_thread(self.close)

    # -- sync shell -----------------------------------------------------------------
    def _submit(self, build: _Build, exchange: _Exchange) -> None:
        with self._lock:
            if self._closed:
                raise ClientClosedError("the endpoint is closed")
            self._pool.submit(self._run_sync, build, exchange)

    def _run_sync(self, build: _Build, exchange: _Exchange) -> None:
        channel = exchange.channel
        try:
            value = self.adapter.auth_value()
            if inspect.isawaitable(value):
                if inspect.iscoroutine(value):
                    value.close()  # never started: close it rather than leak a warning
                raise InvalidConfigError("an async value provider needs AsyncSippClient")
            response = self._client.send(build(self.adapter.headers_for(value)), stream=True)
        except BaseException as exc:
            exchange.fail(_as_sipp_error(exc, self.adapter.name))
            return
        channel.on_cancel(response.close)
        try:
            exchange.start(response.status_code, response.headers)
            for chunk in response.iter_bytes():
                if exchange.feed(chunk) or channel.cancelled.is_set():
                    break
            if channel.cancelled.is_set() and not exchange.finished:
                exchange.cancelled()
            else:
                exchange.end()
        except BaseException as exc:
            if channel.cancelled.is_set():
                exchange.cancelled()
            else:
                exchange.fail(_as_sipp_error(exc, self.adapter.name))
        finally:
            response.close()

    # -- async shell ----------------------------------------------------------------
    def _spawn(self, build: _Build, exchange: _Exchange) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._closed:
                raise ClientClosedError("the endpoint is closed")
            entry = self._async_clients.get(id(loop))
            if entry is None or entry[0] is not loop:
                t = self._timeout
                timeout = aiohttp.ClientTimeout(
                    total=None, sock_connect=t.connect, sock_read=t.read
                )
                entry = (loop, aiohttp.ClientSession(timeout=timeout, auto_decompress=False))
                self._async_clients[id(loop)] = entry
        task = loop.create_task(self._run_async(entry[1], build, exchange))

        def cancel_task() -> None:
            loop.call_soon_threadsafe(task.cancel)

        exchange.channel.on_cancel(cancel_task)

    async def _run_async(
        self,
        session: aiohttp.ClientSession,
        build: _Build,
        exchange: _Exchange,
    ) -> None:
        response: aiohttp.ClientResponse | None = None
        try:
            value = self.adapter.auth_value()
            if inspect.isawaitable(value):
                value = await value
            request = build(self.adapter.headers_for(value))
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
            exchange.end()
        except asyncio.CancelledError:
            exchange.cancelled()
        except BaseException as exc:
            exchange.fail(_as_sipp_error(exc, self.adapter.name))
        finally:
            if response is not None:
                response.release()  # back to the pool if fully read, else the connection closes


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
