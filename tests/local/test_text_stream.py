from __future__ import annotations

import codecs

from hypothesis import given
from hypothesis import strategies as st

from sipp.local.text_stream import TextStream


def _run(pieces: list[bytes], stop: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(stop)
    out = [stream.feed(p) for p in pieces]
    out.append(stream.flush())
    return out, stream


def test_multibyte_characters_are_never_split_at_any_byte_boundary() -> None:
    text = "héllo wörld — 日本語 🎉 ok"
    data = text.encode()
    for cut in range(len(data) + 1):
        out, stream = _run([data[:cut], data[cut:]], [])
        assert "".join(out) == text
        assert all("\ufffd" not in piece for piece in out)
        assert stream.text == text


def test_one_byte_at_a_time() -> None:
    text = "añb🎉c"
    out, _ = _run([bytes([b]) for b in text.encode()], [])
    assert "".join(out) == text
    assert "\ufffd" not in "".join(out)


def test_stop_string_split_across_pieces_is_cut_out() -> None:
    out, stream = _run([b"Hello <|e", b"nd|> more"], ["<|end|>"])
    assert "".join(out) == "Hello "
    assert stream.stopped


def test_the_stop_string_that_matched_first_is_recorded() -> None:
    # "<|end|>" completes in the second piece, "end" already in it at an earlier offset.
    _, stream = _run([b"Hello <|e", b"nd|> more end"], ["<|end|>", "more"])
    assert stream.matched == "<|end|>"
    _, stream = _run([b"one two three"], ["three", "two"])
    assert (stream.text, stream.matched) == ("one ", "two")
    _, stream = _run([b"no match"], ["zzz"])
    assert stream.matched is None


def test_partial_stop_prefix_is_released_when_it_does_not_complete() -> None:
    out, stream = _run([b"a <|e", b"xtra"], ["<|end|>"])
    assert "".join(out) == "a <|extra"
    assert not stream.stopped


def test_earliest_of_several_stops_wins() -> None:
    out, _ = _run([b"one two three"], ["three", "two"])
    assert "".join(out) == "one "


@given(
    text=st.text(min_size=0, max_size=40),
    stop=st.text(min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_stream_equals_batch_processing(text: str, stop: str, cuts: list[int]) -> None:
    data = text.encode()
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    out, _ = _run(pieces, [stop])
    index = text.find(stop)
    expected = text if index < 0 else text[:index]
    assert "".join(out) == expected


@given(pieces=st.lists(st.binary(max_size=6), max_size=10))
def test_any_bytes_decode_as_an_incremental_utf8_decoder_does(pieces: list[bytes]) -> None:
    # Tokens may carry bytes that are not UTF-8 (byte-fallback vocabularies): they read
    # as U+FFFD, and a character cut off at the end is dropped, whatever the split.
    reference = codecs.getincrementaldecoder("utf-8")(errors="replace")
    expected = "".join(reference.decode(p) for p in pieces)
    out, stream = _run(pieces, [])
    assert "".join(out) == expected == stream.text
