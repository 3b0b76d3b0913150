"""Sides that stay up and take turns: each side is a child process that loads once, then
measures whenever the driver writes a line to it, printing one JSON line per measurement.

The machine's speed drifts over seconds here (other tenants of the host), so the two
figures of a round should be taken as close together as possible: with a process per
side and round they were several seconds apart and their ratio swung widely. The idle
side blocks on its input meanwhile, so only one llama context computes at a time.

A round measures each side twice, in the order A B B A (`abba`): a steady drift across
the round weighs on both sides alike (their places add up the same), and each side runs
once just before the other and once just after it, so neither gains from its place (of
a single pair, the side that ran second did about 5 % better, session 11). A round's
figure for a side is its two runs together (`combined`).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import IO, Any

__all__ = ["Child", "abba", "combined", "serve"]

SETTLE_S = 0.5  # before each measurement: the other side's idle ggml threads stop spinning


def abba(first: str, second: str) -> tuple[str, str, str, str]:
    """A round's order: `first` at both ends, `second` twice in the middle."""
    return first, second, second, first


def combined(runs: list[tuple[float, float]]) -> float:
    """One rate from several runs of (amount, seconds): the amounts over the time they
    took together, so a run that went slowly counts for the time it took."""
    return sum(a for a, _ in runs) / sum(s for _, s in runs)


class Child:
    """A side's process, kept up between rounds."""

    def __init__(self, name: str, cmd: list[str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._read()  # "ready": loaded and warmed up

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise SystemExit(f"{self.name} side failed:\n{err[-3000:]}")
        return line

    def measure(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        time.sleep(SETTLE_S)
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self._read())
        return result

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # its input ends: it frees its context and exits
        self.proc.wait(timeout=120)


def serve(measure: Callable[[], dict[str, Any]], commands: IO[str]) -> None:
    """A child's loop: one measurement per line read, each printed as a JSON line."""
    print("ready", flush=True)
    for _ in commands:
        print(json.dumps(measure()), flush=True)
