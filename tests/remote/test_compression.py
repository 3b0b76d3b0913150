"""Compressed upstream responses, through both shells.

Both shells ask for `gzip, deflate` and decode the raw bytes the same way: JSON
bodies, SSE streams (still incremental), error bodies; `deflate` zlib-wrapped or
raw; an unknown coding is a typed error; the body cap counts decompressed bytes.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import zlib

import pytest

from sipp import (
    AsyncSippClient,
    InvalidConfigError,
    ProviderDescriptor,
    RateLimitedError,
    RemoteError,
    SippClient,
    SippTextResponse,
)

from .harness import call
from .loopback import Action, Chunk, LoopbackServer, Request, Status, Wait
from .openai_wire import CHAT, MODES, chunk, completion

COMPLETION = completion("Compressed fine.", 3)


def _provider(server: LoopbackServer) -> ProviderDescriptor:
    return ProviderDescriptor("openai", "gpt-test", api_key="sk-test", base_url=server.url + "/v1")


FIRST = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Streamed"})]
REST = [chunk({"content": " and squeezed."}), chunk({}, "stop"), b"data: [DONE]\n\n"]


def _compressed(body: bytes, coding: str) -> bytes:
    if coding == "gzip":
        return gzip.compress(body)
    if coding == "deflate":
        return zlib.compress(body)
    raw = zlib.compressobj(wbits=-15)  # "raw deflate", which some servers send as deflate
    return raw.compress(body) + raw.flush()


def _json(body: bytes, coding: str, status: int = 200) -> list[Action]:
    header = "deflate" if coding == "raw-deflate" else coding
    data = _compressed(body, coding)
    headers = {"content-type": "application/json", "content-encoding": header}
    # Split the compressed bytes so decoding spans reads.
    return [Status(status, headers), Chunk(data[:7]), Chunk(data[7:])]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate"])
def test_compressed_json_body(mode: str, coding: str) -> None:
    reply = _json(json.dumps(COMPLETION).encode(), coding)
    with LoopbackServer(lambda req: reply) as server:
        response, _ = call(mode, _provider(server), "chat", CHAT)
        sent = server.requests[0].headers
    assert response.text == "Compressed fine." and response.usage.total_tokens == 7
    assert sent["accept-encoding"] == "gzip, deflate"


@pytest.mark.parametrize("mode", MODES)
def test_both_shells_ask_for_the_same_codings(mode: str) -> None:
    reply = _json(json.dumps(COMPLETION).encode(), "gzip")
    with LoopbackServer(lambda req: reply) as server:
        call(mode, _provider(server), "chat", CHAT)
        call(mode, _provider(server), "chat", CHAT, emit_tokens=False)
        codings = {r.headers.get("accept-encoding") for r in server.requests}
    assert codings == {"gzip, deflate"}


@pytest.mark.parametrize("mode", MODES)
def test_compressed_error_body_keeps_its_message(mode: str) -> None:
    error = {"error": {"message": "Slow down", "type": "requests", "code": "rate_limit_exceeded"}}
    reply = _json(json.dumps(error).encode(), "gzip", status=429)
    with LoopbackServer(lambda req: reply) as server:
        with pytest.raises(RateLimitedError, match="Slow down"):
            call(mode, _provider(server), "chat", CHAT)


def _gzip_stream(release: threading.Event) -> list[Action]:
    """A gzip SSE stream flushed per frame: the first token is decodable on its own,
    and the rest is only sent once the test has seen it (`release`)."""
    packer = zlib.compressobj(wbits=31)

    def frame(data: bytes) -> Chunk:
        return Chunk(packer.compress(data) + packer.flush(zlib.Z_SYNC_FLUSH))

    head = [frame(f) for f in FIRST]
    tail = [frame(f) for f in REST]
    tail.append(Chunk(packer.flush()))
    headers = {"content-type": "text/event-stream", "content-encoding": "gzip"}
    return [Status(200, headers), *head, Wait(release), *tail]


def test_gzip_stream_streams_incrementally_sync() -> None:
    release = threading.Event()
    with LoopbackServer(lambda req: _gzip_stream(release)) as server, SippClient() as client:
        ref = client.add("p", _provider(server))
        run = client.chat(CHAT, endpoint=ref, emit_tokens=True)
        batches = iter(run)
        first = next(batches)  # arrives while the server still holds the rest back
        release.set()
        rest = [b.text for b in batches]
        response = run.result(timeout=30)
    assert first.text == "Streamed" and rest == [" and squeezed."]
    assert response.text == "Streamed and squeezed."


def test_gzip_stream_streams_incrementally_async() -> None:
    release = threading.Event()

    async def main() -> tuple[str, list[str], SippTextResponse]:
        async with AsyncSippClient() as client:
            ref = await client.add("p", _provider(server))
            run = client.chat(CHAT, endpoint=ref, emit_tokens=True)
            batches = run.__aiter__()
            first = await batches.__anext__()
            release.set()
            rest = [b.text async for b in batches]
            return first.text, rest, await run.result()

    with LoopbackServer(lambda req: _gzip_stream(release)) as server:
        first, rest, response = asyncio.run(main())
    assert first == "Streamed" and rest == [" and squeezed."]
    assert response.text == "Streamed and squeezed."


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("emit_tokens", [False, True])
def test_unknown_coding_is_a_typed_error(mode: str, emit_tokens: bool) -> None:
    def handler(req: Request) -> list[Action]:
        kind = "text/event-stream" if emit_tokens else "application/json"
        return [Status(200, {"content-type": kind, "content-encoding": "br"}), Chunk(b"\x1b\x00")]

    with LoopbackServer(handler) as server:
        with pytest.raises(RemoteError, match="content-encoding 'br'") as info:
            call(mode, _provider(server), "chat", CHAT, emit_tokens=emit_tokens)
    assert info.value.code == "upstream" and not info.value.retryable


@pytest.mark.parametrize("mode", MODES)
def test_corrupt_compressed_body_is_a_typed_error(mode: str) -> None:
    reply = [
        Status(200, {"content-type": "application/json", "content-encoding": "gzip"}),
        Chunk(b"\x1f\x8b\x08\x00 this is not deflate data at all"),
    ]
    with LoopbackServer(lambda req: reply) as server:
        with pytest.raises(RemoteError, match="compressed response body is corrupt"):
            call(mode, _provider(server), "chat", CHAT)


_BOMB: list[bytes] = []


def _bomb() -> bytes:
    """80 MiB of spaces in about 80 KiB of gzip: over the 64 MiB body cap once inflated."""
    if not _BOMB:
        packer = zlib.compressobj(9, wbits=31)
        block = b" " * (1 << 20)
        _BOMB.append(b"".join(packer.compress(block) for _ in range(80)) + packer.flush())
    return _BOMB[0]


@pytest.mark.parametrize("mode", MODES)
def test_body_cap_counts_decompressed_bytes(mode: str) -> None:
    bomb = _bomb()
    assert len(bomb) < 1 << 20
    reply = [
        Status(200, {"content-type": "application/json", "content-encoding": "gzip"}),
        Chunk(bomb),
    ]
    with LoopbackServer(lambda req: reply) as server:
        with pytest.raises(RemoteError, match="response body exceeds"):
            call(mode, _provider(server), "chat", CHAT)


@pytest.mark.parametrize("mode", MODES)
def test_stream_event_over_the_cap_is_a_typed_error(mode: str) -> None:
    huge = b"data: " + b"x" * (1 << 20) + b"\n\n"
    reply = [
        Status(200, {"content-type": "text/event-stream"}),
        Chunk(FIRST[1]),
        *[Chunk(huge[i : i + 65536]) for i in range(0, len(huge), 65536)],
    ]
    with LoopbackServer(lambda req: reply) as server:
        with pytest.raises(RemoteError, match="server-sent event exceeds 1048576 bytes") as info:
            call(mode, _provider(server), "chat", CHAT, emit_tokens=True)
    assert info.value.partial_text == "Streamed"


@pytest.mark.parametrize("mode", MODES)
def test_the_event_cap_is_configurable(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIPP_SSE_MAX_EVENT_BYTES", "4096")
    event = b"data: " + b"x" * 8192 + b"\n\n"  # well under the 1 MiB default
    reply = [Status(200, {"content-type": "text/event-stream"}), Chunk(FIRST[1]), Chunk(event)]
    with LoopbackServer(lambda req: reply) as server:
        with pytest.raises(RemoteError, match="server-sent event exceeds 4096 bytes"):
            call(mode, _provider(server), "chat", CHAT, emit_tokens=True)


@pytest.mark.parametrize("value", ["0", "-5", "1e6", "lots", ""])
def test_a_bad_event_cap_is_refused_when_the_endpoint_is_added(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIPP_SSE_MAX_EVENT_BYTES", value)
    with SippClient() as client:
        with pytest.raises(InvalidConfigError, match="SIPP_SSE_MAX_EVENT_BYTES"):
            client.add("p", ProviderDescriptor("openai", "m", api_key="k"))
