"""Response content codings: what both shells ask for and how the exchange undoes it.

Both shells send the same `Accept-Encoding` and hand the exchange the raw bytes
(httpx `iter_raw`, aiohttp `auto_decompress=False`); decoding happens here, once,
so the two behave the same. Output comes in bounded pieces, so the body cap
counts decompressed bytes and a small compressed body cannot inflate past it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from .._errors import RemoteError

__all__ = ["ACCEPT_ENCODING", "ContentDecoder", "content_decoder"]

ACCEPT_ENCODING = "gzip, deflate"
_PIECE = 64 << 10  # largest decompressed piece handed on at once


def content_decoder(header: str | None, name: str) -> ContentDecoder | None:
    """The decoder for a `Content-Encoding` value; None for identity (the hot path).
    Raises `RemoteError` for a coding we did not ask for."""
    codings = [c.strip().lower() for c in (header or "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in ("gzip", "x-gzip", "deflate"):
        return ContentDecoder(codings[0], name)
    raise RemoteError(
        f"{name}: the response uses content-encoding {header!r}; only {ACCEPT_ENCODING} "
        "are accepted"
    )


class ContentDecoder:
    def __init__(self, coding: str, name: str) -> None:
        self._name = name
        # deflate: RFC 9110 means zlib-wrapped, but some servers send raw deflate; the
        # first two bytes tell which, so that decoder is made once they arrive.
        self._zlib = None if coding == "deflate" else zlib.decompressobj(wbits=31)
        self._head = b""

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Decompressed pieces of at most 64 KiB for `data`."""
        decoder = self._zlib
        if decoder is None:
            data = self._head + data
            if len(data) < 2:
                self._head = data
                return
            decoder = self._zlib = zlib.decompressobj(wbits=15 if _zlib_header(data) else -15)
        try:
            while True:
                out = decoder.decompress(data, _PIECE)
                if out:
                    yield out
                data = decoder.unconsumed_tail
                if not data and len(out) < _PIECE:
                    return
        except zlib.error as exc:
            raise RemoteError(
                f"{self._name}: the compressed response body is corrupt ({exc})"
            ) from None


def _zlib_header(data: bytes) -> bool:
    return data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
