"""Turn token bytes into safe text: whole UTF-8 characters, stop strings cut out.

Tokens can end in the middle of a multi-byte character, and a stop string can
span several tokens; a generation that ends mid-character drops those bytes. `TextStream` holds back exactly what might still change:
the incomplete character bytes and the longest tail that could begin a stop
string. Nothing it releases is ever taken back.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

__all__ = ["TextStream"]


class TextStream:
    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._whole = True  # the decoder holds no bytes of an unfinished character
        self._stops = tuple(stop)
        self._held = ""
        self._released: list[str] = []  # joined on demand: `text +=` copies it every token
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    @property
    def text(self) -> str:
        """Everything released so far."""
        if len(self._released) > 1:
            self._released[:] = ["".join(self._released)]
        return self._released[0] if self._released else ""

    def feed(self, data: bytes) -> str:
        """Add token bytes; return the newly releasable text."""
        if self.stopped:
            return ""
        if self._whole:
            # Nothing pending: most tokens are whole characters, and bytes.decode is far
            # cheaper than the incremental decoder's Python layer.
            try:
                text = data.decode()
            except UnicodeDecodeError:
                self._whole = False
            else:
                return self._release(self._held + text, final=False)
        text = self._decoder.decode(data)
        self._whole = not self._decoder.getstate()[0]
        return self._release(self._held + text, final=False)

    def flush(self) -> str:
        """End of generation: release whatever is held (minus a stop match).

        Bytes of a character the generation stopped in the middle of (e.g. cut by
        `max_tokens`) are dropped, never turned into U+FFFD: they were never text."""
        if self.stopped:
            return ""
        self._decoder.reset()
        return self._release(self._held, final=True)

    def _release(self, pending: str, *, final: bool) -> str:
        if not self._stops:
            self._held = ""
            if pending:
                self._released.append(pending)
            return pending
        hit = self._first_stop(pending)
        if hit is not None:
            cut, self.matched = hit
            out, self._held, self.stopped = pending[:cut], "", True
        elif final:
            out, self._held = pending, ""
        else:
            keep = self._partial_stop_tail(pending)
            out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        if out:
            self._released.append(out)
        return out

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        """Where the earliest stop string starts in `text`, and which one it is."""
        hits = [(i, s) for s in self._stops if (i := text.find(s)) >= 0]
        return min(hits, key=lambda hit: hit[0]) if hits else None

    def _partial_stop_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
