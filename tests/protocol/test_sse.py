from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipp import InvalidConfigError, RemoteError, TokenBatch
from sipp.protocol import SSEDecoder, SSEEvent, done_frame, encode_sse, token_frame
from sipp.protocol.sse import MAX_EVENT_BYTES

STREAM = (
    token_frame(TokenBatch("Gate", (), 0))
    + token_frame(TokenBatch("ways — 日本 🎉", (), 1))
    + b": a comment line\n\n"
    + encode_sse("usage", '{"input_tokens":8,"output_tokens":9,"total_tokens":17}')
    + done_frame("stop")
)
EXPECTED = [
    SSEEvent("token", '{"text":"Gate","sequence":0}'),
    SSEEvent("token", '{"text":"ways — 日本 🎉","sequence":1}'),
    SSEEvent("usage", '{"input_tokens":8,"output_tokens":9,"total_tokens":17}'),
    SSEEvent("done", '{"finish_reason":"stop"}'),
]


def _decode(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


def test_whole_stream() -> None:
    assert _decode([STREAM]) == EXPECTED


def test_every_single_split_point() -> None:
    for cut in range(len(STREAM) + 1):
        assert _decode([STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut


def test_byte_at_a_time() -> None:
    assert _decode([bytes([b]) for b in STREAM]) == EXPECTED


def test_crlf_and_cr_line_endings_split_anywhere() -> None:
    for ending in (b"\r\n", b"\r"):
        stream = STREAM.replace(b"\n", ending)
        for cut in range(len(stream) + 1):
            assert _decode([stream[:cut], stream[cut:]]) == EXPECTED, (ending, cut)


def test_multiline_data_id_and_retry() -> None:
    frame = b"event: note\nid: 7\nretry: 1500\ndata: line one\ndata:line two\n\n"
    assert _decode([frame]) == [SSEEvent("note", "line one\nline two", "7", 1500)]
    assert encode_sse("x", "a\nb") == b"event: x\ndata: a\ndata: b\n\n"


def test_unterminated_last_event_is_reported_as_partial() -> None:
    decoder = SSEDecoder()
    events = list(decoder.feed(STREAM + b'event: token\ndata: {"text"'))
    assert events == EXPECTED
    assert decoder.has_partial


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_random_chunking(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)])]
    assert _decode(chunks) == EXPECTED


def test_an_event_over_the_cap_is_a_typed_error() -> None:
    decoder = SSEDecoder(max_event_bytes=64)
    assert decoder.feed(b"data: " + b"x" * 40 + b"\n\n") == [SSEEvent("message", "x" * 40)]
    # Several lines of one frame add up, terminators included.
    with pytest.raises(RemoteError, match="exceeds 64 bytes") as info:
        decoder.feed(b"data: " + b"y" * 30 + b"\ndata: " + b"y" * 30 + b"\n")
    assert info.value.code == "upstream"


def test_a_line_that_never_ends_hits_the_cap_while_it_arrives() -> None:
    decoder = SSEDecoder(max_event_bytes=1000)
    decoder.feed(b"data: ")
    with pytest.raises(RemoteError, match="exceeds 1000 bytes"):
        for _ in range(100):
            decoder.feed(b"z" * 100)


def test_default_cap_is_one_mebibyte() -> None:
    decoder = SSEDecoder()
    assert decoder.max_event_bytes == MAX_EVENT_BYTES == 1 << 20
    big = b"data: " + b"a" * (MAX_EVENT_BYTES - 10) + b"\n\n"
    assert decoder.feed(big)[0].data == "a" * (MAX_EVENT_BYTES - 10)
    with pytest.raises(RemoteError):
        decoder.feed(b"data: " + b"a" * MAX_EVENT_BYTES + b"\n\n")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_cap_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(InvalidConfigError):
        SSEDecoder(max_event_bytes=bad)  # type: ignore[arg-type]


def test_ten_megabytes_of_small_events_in_tiny_chunks_is_scanned_once() -> None:
    frame = token_frame(TokenBatch("tok", (), 0))
    stream = frame * (10_000_000 // len(frame))
    decoder = SSEDecoder()
    count = 0
    for i in range(0, len(stream), 7):
        count += len(decoder.feed(stream[i : i + 7]))
    assert count == len(stream) // len(frame)
    # Each byte is searched at most once for LF and once for CR, whatever the chunking.
    assert decoder.scanned_bytes <= 2 * len(stream)


@pytest.mark.parametrize("ending", [b"\n", b"\r", b"\r\n"])
def test_one_long_line_in_small_chunks_is_not_rescanned(ending: bytes) -> None:
    line = b"data: " + b"q" * 500_000
    decoder = SSEDecoder()
    events = []
    for i in range(0, len(line), 100):
        events += decoder.feed(line[i : i + 100])
    # A frame of CR-terminated lines: the LF search must not restart after every line.
    events += decoder.feed((ending + b"data: r") * 1000 + ending + ending)
    assert events == [SSEEvent("message", "\n".join(["q" * 500_000] + ["r"] * 1000))]
    total = len(line) + len(ending) * 1002 + 7 * 1000
    assert decoder.scanned_bytes <= 2 * total
