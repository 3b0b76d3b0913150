"""Server-sent events: an encoder and an incremental decoder.

The decoder takes bytes in whatever pieces the network delivers (a frame
may be split at any byte, even inside a UTF-8 character or between `\\r` and
`\\n`) and yields complete events. It follows the WHATWG event-stream rules:
lines end in LF, CR or CRLF; `event:`, `data:` (multi-line joined with LF),
`id:` and `retry:` fields; `:` comments; a blank line dispatches.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import InvalidConfigError, RemoteError

__all__ = ["MAX_EVENT_BYTES", "SSEDecoder", "SSEEvent", "encode_sse"]

MAX_EVENT_BYTES = 1 << 20  # default cap on one event's frame; providers send a few KiB


@dataclass(frozen=True)
class SSEEvent:
    event: str
    data: str
    id: str | None = None
    retry: int | None = None


def encode_sse(event: str, data: str) -> bytes:
    """One frame: `event: NAME` plus a `data:` line per line of `data`, then a blank line."""
    lines = data.split("\n")
    return (
        "event: " + event + "\n" + "".join("data: " + line + "\n" for line in lines) + "\n"
    ).encode()


class SSEDecoder:
    """Incremental decoder. `max_event_bytes` caps one frame (every line up to the blank
    line that ends it, terminators included): past it `feed` raises `RemoteError`, so a
    peer that never ends a line or a frame cannot grow memory without bound."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        if (
            isinstance(max_event_bytes, bool)
            or not isinstance(max_event_bytes, int)
            or max_event_bytes <= 0
        ):
            raise InvalidConfigError("max_event_bytes must be a positive integer")
        self.max_event_bytes = max_event_bytes
        # Lines are split on bytes (CR and LF never occur inside a UTF-8 sequence) and
        # each complete line is decoded on its own, so a character split across chunks
        # needs no incremental text decoder.
        self._buffer = bytearray()
        self._scanned = 0  # bytes of `_buffer` already searched for a line end
        self._frame_bytes = 0  # bytes of the current frame's complete lines
        self.scanned_bytes = 0  # total searched, for tests: stays linear in the input
        self._pending_cr = False
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._retry: int | None = None
        self._seen_field = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Events completed by `chunk` (possibly none)."""
        buffer: bytes | bytearray
        if self._buffer:
            self._buffer += chunk
            buffer = self._buffer
        else:
            buffer = chunk  # the usual case: search the chunk itself, keep only its tail
        pos = 0
        if self._pending_cr and buffer is chunk and chunk[:1] == b"\n":
            pos = 1  # the LF of a CRLF whose CR ended the previous chunk
        if chunk:
            self._pending_cr = False
        scan = max(pos, self._scanned)
        size = len(buffer)
        cap = self.max_event_bytes
        frame = self._frame_bytes
        events: list[SSEEvent] = []
        # Each byte is searched at most once for LF and once for CR, here and across
        # calls (`_scanned`), so decoding stays linear however the stream is chunked.
        lf = buffer.find(b"\n", scan)
        scanned = (lf + 1 if lf >= 0 else size) - scan
        while True:
            if 0 <= lf < scan:
                lf = buffer.find(b"\n", scan)
                scanned += (lf + 1 if lf >= 0 else size) - scan
            stop = lf if lf >= 0 else size
            cr = buffer.find(b"\r", scan, stop)
            if cr >= 0:
                scanned += cr + 1 - scan
                end, width = cr, 2 if cr + 1 == lf else 1
                if width == 1 and end + 1 == size:
                    self._pending_cr = True  # maybe CRLF split across chunks
            elif lf >= 0:
                scanned += stop - scan
                end, width = lf, 1
            else:
                scanned += stop - scan
                break
            frame += end + width - pos
            if frame > cap:
                self._too_large()
            if end == pos:  # a blank line ends the frame
                frame = 0
                event = self._dispatch()
            else:
                event = self._line(buffer[pos:end].decode("utf-8", "replace"))
            pos = scan = end + width
            if event is not None:
                events.append(event)
        self.scanned_bytes += scanned
        self._frame_bytes = frame
        if buffer is chunk:
            if pos < size:
                self._buffer += chunk[pos:]
        elif pos:
            del self._buffer[:pos]
        self._scanned = len(self._buffer)
        if frame + self._scanned > cap:
            self._too_large()
        return events

    def _too_large(self) -> None:
        raise RemoteError(f"a server-sent event exceeds {self.max_event_bytes} bytes")

    def close(self) -> SSEEvent | None:
        """End of stream. Per the spec an unterminated last event is discarded; return None."""
        self._buffer.clear()
        self._scanned = 0
        return None

    @property
    def has_partial(self) -> bool:
        """True if bytes of an unfinished event are buffered (a stream cut mid-frame)."""
        return bool(self._buffer) or self._seen_field

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        self._seen_field = True
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._seen_field:
            return None
        has_data = bool(self._data)
        event = SSEEvent(self._event or "message", "\n".join(self._data), self._id, self._retry)
        self._event, self._data, self._retry, self._seen_field = "", [], None, False
        return event if has_data else None  # a frame without data lines dispatches nothing
