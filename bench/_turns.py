"""Sides that stay up and take turns: each side is a child process that loads once, then
measures whenever the driver writes a line to it, printing one JSON line per measurement.

The machine's speed drifts over seconds here (other tenants of the host), so a round's
figures should be taken as close together as possible: with a process per
side and round they were several seconds apart and their ratio swung widely. Only one
side computes at a time.

A side that waits is stopped (SIGSTOP to its process group, `hold`) and continued for its
turn (`resume`), so nothing of it runs during another side's measurement. An idle
llama-cpp-python server still wakes ten times a second (uvicorn's tick, about 250 µs of
CPU each here), and with it merely alive the sipp child ran 8-chat bursts at 0.949 of
llama-batched-bench (8 A B B A rounds), against 1.024 with no server and 1.003 with the
server stopped (session 13): the wakes cost the long-lived side more than the fresh one.

A round measures each side twice, in the order A B B A (`abba`): a steady drift across
the round weighs on both sides alike (their places add up the same), and each side runs
once just before the other and once just after it, so neither gains from its place (of
a single pair, the side that ran second did about 5 % better, session 11). A round's
figure for a side is its two runs together (`combined`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import IO, Any

__all__ = ["OWN_GROUP", "Child", "abba", "combined", "hold", "resume", "serve"]

SETTLE_S = 0.5  # before a measurement: the side just resumed catches up on timers and polling


def abba(first: str, second: str) -> tuple[str, str, str, str]:
    """A round's order: `first` at both ends, `second` twice in the middle."""
    return first, second, second, first


def combined(runs: list[tuple[float, float]]) -> float:
    """One rate from several runs of (amount, seconds): the amounts over the time they
    took together, so a run that went slowly counts for the time it took."""
    return sum(a for a, _ in runs) / sum(s for _, s in runs)


# Popen arguments that start a side in a process group of its own, in the driver's
# session: if the driver dies while the side is stopped, the group is orphaned and the
# kernel sends it SIGHUP and SIGCONT, so nothing is left stopped behind it (a new session
# would not get them).
OWN_GROUP: dict[str, Any] = (
    {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
)


def hold(proc: subprocess.Popen[Any]) -> None:
    """Stop `proc` and everything it started; `proc` must lead its own process group
    (started with `OWN_GROUP`)."""
    os.killpg(proc.pid, signal.SIGSTOP)


def resume(proc: subprocess.Popen[Any]) -> None:
    os.killpg(proc.pid, signal.SIGCONT)


class Child:
    """A side's process, kept up between rounds and stopped between its turns."""

    def __init__(self, name: str, cmd: list[str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **OWN_GROUP,
        )
        self._read()  # "ready": loaded and warmed up
        hold(self.proc)

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise SystemExit(f"{self.name} side failed:\n{err[-3000:]}")
        return line

    def measure(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        resume(self.proc)
        time.sleep(SETTLE_S)
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self._read())
        hold(self.proc)
        return result

    def close(self) -> None:
        resume(self.proc)
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # its input ends: it frees its context and exits
        self.proc.wait(timeout=120)


def serve(measure: Callable[[], dict[str, Any]], commands: IO[str]) -> None:
    """A child's loop: one measurement per line read, each printed as a JSON line."""
    print("ready", flush=True)
    for _ in commands:
        print(json.dumps(measure()), flush=True)
