"""llama.cpp's log reaches Python in pieces, from any thread that calls into it.

The callback joins pieces into lines; pieces of different threads must never be
spliced into one line, and no piece may be lost."""

from __future__ import annotations

import logging
import threading

import pytest

from sipp.local import _llama


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sipp.llama"]


def _interleave(level: int, a_head: bytes, b_line: bytes, a_tail: bytes) -> None:
    """Thread A logs `a_head`, thread B then logs a whole line, then A ends its own."""
    a_began, b_ended = threading.Event(), threading.Event()

    def a() -> None:
        _llama._log_to_python(level, a_head, None)
        a_began.set()
        assert b_ended.wait(30)
        _llama._log_to_python(level, a_tail, None)

    def b() -> None:
        assert a_began.wait(30)
        _llama._log_to_python(level, b_line, None)
        b_ended.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


def test_a_line_in_progress_on_one_thread_is_not_joined_to_anothers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="sipp.llama")
    _interleave(3, b"thread A says ", b"thread B says bye\n", b"hello\n")
    assert sorted(_lines(caplog)) == [
        "llama.cpp: thread A says hello",
        "llama.cpp: thread B says bye",
    ]


def test_many_threads_logging_in_pieces_give_whole_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sipp.llama")
    n_threads, n_lines = 8, 200
    start = threading.Barrier(n_threads)

    def worker(t: int) -> None:
        start.wait()
        for i in range(n_lines):
            for piece in (f"t{t} ", f"line {i} ", "end\n"):
                _llama._log_to_python(3, piece.encode(), None)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    expected = {f"llama.cpp: t{t} line {i} end" for t in range(n_threads) for i in range(n_lines)}
    lines = _lines(caplog)
    assert len(lines) == len(expected) and set(lines) == expected


def test_error_lines_from_threads_are_kept_whole_for_load_errors() -> None:
    _llama.recent_log_errors()
    _interleave(4, b"failed to ", b"bad magic\n", b"open file\n")  # GGML_LOG_LEVEL_ERROR
    assert sorted(_llama.recent_log_errors()) == ["bad magic", "failed to open file"]


def test_only_error_lines_explain_a_failure() -> None:
    """ggml's levels: 2 is INFO (a load's chatter), 4 ERROR, 5 continues the line."""
    _llama.recent_log_errors()
    _llama._log_to_python(2, b"load_hparams: n_embd: 64\n", None)
    _llama._log_to_python(4, b"mismatch between text model ", None)
    _llama._log_to_python(5, b"and mmproj\n", None)
    _llama._log_to_python(3, b"a warning\n", None)
    assert _llama.recent_log_errors() == ["mismatch between text model and mmproj"]
