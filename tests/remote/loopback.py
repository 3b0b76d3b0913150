"""A scripted HTTP/1.1 server on 127.0.0.1 for remote-endpoint tests.

Real sockets, real HTTP framing: each request is answered by a handler that
returns a list of actions (status line + headers, body chunks written with
chunked encoding, pauses, an abrupt reset, a plain close). That lets one
server produce the providers' real JSON/SSE shapes and every fault case.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Status:
    code: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Chunk:
    data: bytes


@dataclass
class Raw:
    """Bytes written as they are, outside any chunked framing (e.g. a status line sent a
    byte at a time). A response with one ends by closing the connection."""

    data: bytes


@dataclass
class Sleep:
    seconds: float


@dataclass
class Wait:
    """Pause until the test sets `event` (or `timeout` passes): lets a test check what the
    client did before the server answers, without timing assumptions."""

    event: threading.Event
    timeout: float = 30.0


class Reset:
    """Close with SO_LINGER 0: the peer sees a TCP reset."""


class Close:
    """Close without finishing the chunked body."""


Action = Status | Chunk | Raw | Sleep | Wait | Reset | Close
Handler = Callable[[Request], list[Action]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def json_reply(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> list[Action]:
    body = json.dumps(obj).encode()
    return [Status(status, {"content-type": "application/json", **(headers or {})}), Chunk(body)]


def sse_reply(frames: list[bytes], headers: dict[str, str] | None = None) -> list[Action]:
    return [
        Status(200, {"content-type": "text/event-stream", **(headers or {})}),
        *[Chunk(f) for f in frames],
    ]


class LoopbackServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.open_connections = 0
        self.hangups = 0  # clients that hung up while the server paused
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="loopback-server", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                self.requests.append(request)
                if not await self._respond(reader, writer, self.handler(request)):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            self._tasks.discard(task)
            self.open_connections -= 1
            if not writer.is_closing():
                writer.close()

    async def _respond(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, actions: list[Action]
    ) -> bool:
        finished = True
        for action in actions:
            if isinstance(action, Status):
                head = f"HTTP/1.1 {action.code} {_REASONS.get(action.code, 'Status')}\r\n"
                headers = {"transfer-encoding": "chunked", **action.headers}
                head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
                writer.write(head.encode())
            elif isinstance(action, Raw):
                finished = False
                writer.write(action.data)
                await writer.drain()
            elif isinstance(action, Chunk):
                writer.write(f"{len(action.data):x}\r\n".encode() + action.data + b"\r\n")
                await writer.drain()
            elif isinstance(action, Sleep | Wait):
                await writer.drain()
                # Pause, but notice a client that hangs up meanwhile (EOF on the socket).
                eof = asyncio.ensure_future(reader.read(1))
                if isinstance(action, Sleep):
                    pause = asyncio.ensure_future(asyncio.sleep(action.seconds))
                else:
                    pause = asyncio.ensure_future(
                        asyncio.to_thread(action.event.wait, action.timeout)
                    )
                done, _ = await asyncio.wait({eof, pause}, return_when=asyncio.FIRST_COMPLETED)
                if eof in done:
                    self.hangups += 1
                    pause.cancel()
                    return False
                eof.cancel()  # and let it finish, so the next request's read starts clean
                with contextlib.suppress(asyncio.CancelledError):
                    await eof
            elif isinstance(action, Reset):
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return False
            elif isinstance(action, Close):
                await writer.drain()
                writer.close()
                return False
        if not finished:
            await writer.drain()
            writer.close()
            return False
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    line = await reader.readline()
    if not line:
        return None
    method, path, _ = line.decode().split(" ", 2)
    headers: dict[str, str] = {}
    while True:
        raw = await reader.readline()
        if raw in (b"\r\n", b"\n", b""):
            break
        name, _, value = raw.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    return Request(method, path, headers, body)


def full_backlog_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A loopback port whose accept queue is full: new connects hang (connect timeout)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(server.getsockname())
        fillers.append(s)
    return server, fillers
