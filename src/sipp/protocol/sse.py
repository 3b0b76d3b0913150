"""Server-sent events: an encoder and an incremental decoder.

The decoder takes bytes in whatever pieces the network delivers (a frame
may be split at any byte, even inside a UTF-8 character or between `\\r` and
`\\n`) and yields complete events. It follows the WHATWG event-stream rules:
lines end in LF, CR or CRLF; `event:`, `data:` (multi-line joined with LF),
`id:` and `retry:` fields; `:` comments; a blank line dispatches.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEEvent", "encode_sse"]


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
    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._pending_cr = False
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._retry: int | None = None
        self._seen_field = False

    def feed(self, chunk: bytes) -> Iterator[SSEEvent]:
        """Events completed by `chunk` (possibly none)."""
        text = self._text.decode(chunk)
        if self._pending_cr and text.startswith("\n"):
            text = text[1:]  # the LF of a CRLF whose CR ended the previous chunk
        self._pending_cr = False
        self._buffer += text
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                break
            end, width = cut
            if width == 1 and self._buffer[end] == "\r" and end + 1 == len(self._buffer):
                self._pending_cr = True  # maybe CRLF split across chunks
            line, self._buffer = self._buffer[:end], self._buffer[end + width :]
            event = self._line(line)
            if event is not None:
                yield event

    def close(self) -> SSEEvent | None:
        """End of stream. Per the spec an unterminated last event is discarded; return None."""
        self._buffer = ""
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


def _line_end(buffer: str) -> tuple[int, int] | None:
    """(index, width) of the first line terminator: LF, CR or CRLF."""
    lf = buffer.find("\n")
    cr = buffer.find("\r", 0, lf if lf >= 0 else len(buffer))
    if cr >= 0:
        return cr, 2 if cr + 1 == lf else 1
    return (lf, 1) if lf >= 0 else None
