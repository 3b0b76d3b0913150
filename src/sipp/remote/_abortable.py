"""An httpx transport whose blocking socket calls a cancel can interrupt and a deadline bounds.

httpx has neither a total deadline nor a way to stop a request that is still
connecting or waiting for headers. Its engine, httpcore, takes a network
backend, so ours wraps every socket call: before blocking it registers the
socket with the `Attempt` running on this thread (a thread-local) and clamps
the call's timeout to the attempt's deadline. `Attempt.abort()`, from any
thread, shuts the socket down, which wakes a blocked connect, send or recv.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
import typing
from collections.abc import Callable, Iterable

import httpcore
import httpx

__all__ = ["Attempt", "abortable_transport", "current"]

T = typing.TypeVar("T")
_local = threading.local()


class Attempt:
    """One request on one worker thread: its deadline and the socket it is blocked on."""

    def __init__(self, deadline: Callable[[], float]) -> None:
        self._deadline = deadline  # read on every call: a stream moves it forward
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.aborted = False

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            # Under the lock: once `call` returns, the socket may go back to the pool and
            # serve another request, which this must not shut down.
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def call(
        self,
        sock: socket.socket,
        timeout: float | None,
        op: Callable[[float | None], T],
        expired: type[Exception],
        broken: type[Exception],
    ) -> T:
        """Run `op(timeout)` blocked on `sock`, the timeout clamped to the deadline."""
        remaining = self._deadline() - time.monotonic()
        if remaining <= 0:
            raise expired("the request deadline passed")
        with self._lock:
            if self.aborted:
                raise broken("the request was aborted")
            self._sock = sock
        try:
            return op(remaining if timeout is None else min(timeout, remaining))
        finally:
            with self._lock:
                self._sock = None

    def __enter__(self) -> Attempt:
        _local.attempt = self
        return self

    def __exit__(self, *exc: object) -> None:
        _local.attempt = None


def current() -> Attempt | None:
    attempt: Attempt | None = getattr(_local, "attempt", None)
    return attempt


class _Stream(httpcore.NetworkStream):
    """A socket as httpcore wants it; every blocking call goes through the thread's attempt."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def _call(
        self,
        timeout: float | None,
        op: Callable[[float | None], T],
        expired: type[Exception],
        broken: type[Exception],
    ) -> T:
        def run(t: float | None) -> T:
            self._sock.settimeout(t)
            try:
                return op(t)
            except TimeoutError as exc:
                raise expired(str(exc) or "timed out") from exc
            except OSError as exc:
                raise broken(str(exc)) from exc

        attempt = current()
        if attempt is None:
            return run(timeout)
        return attempt.call(self._sock, timeout, run, expired, broken)

    def connect(self, address: typing.Any, timeout: float | None) -> None:
        # Linux wakes a connect blocked in SYN_SENT when the socket is shut down.
        self._call(
            timeout,
            lambda _: self._sock.connect(address),
            httpcore.ConnectTimeout,
            httpcore.ConnectError,
        )

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._call(
            timeout, lambda _: self._sock.recv(max_bytes), httpcore.ReadTimeout, httpcore.ReadError
        )

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if buffer:
            self._call(
                timeout,
                lambda _: self._sock.sendall(buffer),
                httpcore.WriteTimeout,
                httpcore.WriteError,
            )

    def close(self) -> None:
        self._sock.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        def handshake(_: float | None) -> ssl.SSLSocket:
            return ssl_context.wrap_socket(self._sock, server_hostname=server_hostname)

        return _Stream(
            self._call(timeout, handshake, httpcore.ConnectTimeout, httpcore.ConnectError)
        )

    def get_extra_info(self, info: str) -> typing.Any:
        sock = self._sock
        if info == "ssl_object":
            # httpcore only asks it for the negotiated ALPN protocol, which SSLSocket answers.
            return sock if isinstance(sock, ssl.SSLSocket) else None
        if info == "client_addr":
            return sock.getsockname()
        if info == "server_addr":
            return sock.getpeername()
        if info == "socket":
            return sock
        if info == "is_readable":
            # An idle pooled connection the server closed reads as ready (EOF).
            return _readable(sock)
        return None


def _readable(sock: socket.socket) -> bool:
    if sock.fileno() < 0:
        return True
    if hasattr(select, "poll"):  # select.select cannot take descriptors past 1023
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])


class _Backend(httpcore.NetworkBackend):
    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        attempt = current()
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        error: Exception = httpcore.ConnectError(f"no address for {host}")
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                if local_address is not None:
                    sock.bind((local_address, 0))
                for option in socket_options or ():
                    sock.setsockopt(*option)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                stream = _Stream(sock)
                stream.connect(address, timeout)
                return stream
            except Exception as exc:
                sock.close()
                if isinstance(exc, httpcore.ConnectTimeout | httpcore.ConnectError):
                    error = exc
                    if attempt is not None and attempt.aborted:
                        raise
                    continue
                raise
        raise error

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:  # pragma: no cover - no unix-socket URLs in descriptors
        raise httpcore.ConnectError("unix sockets are not supported")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _Transport(httpx.HTTPTransport):
    def __init__(self, max_connections: int) -> None:
        super().__init__()
        # httpx builds its pool without a way to pass a network backend; rebuild it with
        # the same settings httpx uses by default plus ours.
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=5.0,
            network_backend=_Backend(),
        )


def abortable_transport(max_connections: int) -> httpx.HTTPTransport:
    return _Transport(max_connections)
