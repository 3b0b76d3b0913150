from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sipp import TokenBatch
from sipp.protocol import SSEDecoder, SSEEvent, done_frame, encode_sse, token_frame

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
