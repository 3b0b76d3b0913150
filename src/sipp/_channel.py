"""`RunChannel`: the one hand-off between an engine thread and a run handle.

The engine (a worker thread for local models, an HTTP call for remote ones)
pushes token batches and then exactly one outcome. Sync handles block on a
condition variable; async handles are woken with `call_soon_threadsafe`, so
both twins read the same object and behave identically.

A producer on another thread may let a batch wait a little (`push(..., hold_s=)`)
instead of waking the consumer for every token. A batch consumer that took a batch
and finds nothing more sets itself a time to come back, `hold_s` after that take;
until then pushes leave their batches for that visit. Waking costs the producer a
system call, and often the GIL for as long as the woken thread runs, so a stream of
fast tokens is handed over a few at a time, each at most `hold_s` late. The first
batch, the outcome and any batch pushed while no visit is due wake at once.
A consumer sets no such time while batches come further apart than `hold_s` (eight
streams sharing an engine step get a token a step, slower than the hold): its visit
would find nothing, and the next push must wake it anyway, so the loop would wake
twice a batch instead of once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from ._errors import SippError
from ._types import TokenBatch

__all__ = ["RunChannel"]

R = TypeVar("R")
_NOT_SET = object()


class RunChannel(Generic[R]):
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._batches: deque[TokenBatch] = deque()
        self._outcome: object = _NOT_SET
        self._wakers: list[Callable[[], None]] = []
        self._cancel_reason: str | None = None
        self._cancel_hooks: list[Callable[[], None]] = []
        self.cancelled = threading.Event()
        self._preparing = False
        # Held batches (see the module docstring), under `_cond`; monotonic seconds.
        self._hold_s = 0.0  # the last push's hold
        self._taken_at = -math.inf  # when the batch consumer last took a batch
        self._back_at = -math.inf  # when the waiting batch consumer comes back on its own
        self._pushed_at = -math.inf  # the last push, and its distance from the one before
        self._push_gap = math.inf

    # -- producer side (engine) ---------------------------------------------
    def push(self, batch: TokenBatch, *, hold_s: float = 0.0) -> None:
        """Hand `batch` to the consumer. With `hold_s`, a consumer due back on its own (at
        most `hold_s` after its last take) is left to find this batch then."""
        with self._cond:
            self._batches.append(batch)
            self._hold_s = hold_s
            now = time.monotonic()
            self._push_gap, self._pushed_at = now - self._pushed_at, now
            if hold_s > 0.0 and now < self._back_at:
                return
            self._wake()

    def finish(self, outcome: R | SippError) -> None:
        """Set the result (or the error). Later calls are ignored: first outcome wins."""
        with self._cond:
            if self._outcome is _NOT_SET:
                self._outcome = outcome
                self._wake()

    def begin_preparing(self) -> None:
        """The endpoint prepares the request off the caller's thread and has not accepted
        it yet; `accepted_async` waits for `end_preparing` (or an outcome)."""
        self._preparing = True

    def end_preparing(self) -> None:
        with self._cond:
            self._preparing = False
            self._wake()

    @property
    def done(self) -> bool:
        return self._outcome is not _NOT_SET

    @property
    def batch_waiting(self) -> bool:
        """A batch is queued: the next take needs no wait. Read without the lock: only
        the one consumer takes batches, so a True cannot go stale before it takes."""
        return bool(self._batches)

    @property
    def preparing(self) -> bool:
        return self._preparing and not self.done

    @property
    def cancel_reason(self) -> str | None:
        return self._cancel_reason

    # -- consumer side (run handles) ------------------------------------------
    def on_cancel(self, hook: Callable[[], None]) -> None:
        """Run `hook` when the run is cancelled (at once if it already was).

        Engines that block in I/O use this to interrupt the blocking call."""
        with self._cond:
            if not self.cancelled.is_set():
                self._cancel_hooks.append(hook)
                return
        hook()

    def request_cancel(self, reason: str | None) -> None:
        with self._cond:
            if self._cancel_reason is None:
                self._cancel_reason = reason or "cancelled"
            self.cancelled.set()
            hooks, self._cancel_hooks = self._cancel_hooks, []
            self._wake()
        for hook in hooks:
            hook()

    def next_batch(self, timeout: float | None = None) -> TokenBatch | None:
        """The next batch, or None once the run is finished and drained."""
        deadline = None if timeout is None else time.monotonic() + timeout
        first = True
        with self._cond:
            while not (self._batches or self.done):
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise TimeoutError("no token batch within the timeout")
                wait = self._come_back_in(now, first)
                first = False
                if deadline is not None:
                    wait = deadline - now if wait is None else min(wait, deadline - now)
                self._cond.wait(wait)
            return self._take()

    def outcome(self, timeout: float | None = None) -> R:
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError("the run did not finish within the timeout")
            return self._unwrap()

    async def next_batch_async(self) -> TokenBatch | None:
        await self._wait_async(lambda: bool(self._batches) or self.done, batches=True)
        with self._cond:
            return self._take()

    async def accepted_async(self) -> None:
        await self._wait_async(lambda: not self._preparing or self.done)

    async def outcome_async(self) -> R:
        await self._wait_async(lambda: self.done)
        with self._cond:
            return self._unwrap()

    # -- internals --------------------------------------------------------------
    def _take(self) -> TokenBatch | None:
        """The oldest batch, if any (under `_cond`); a take starts a new hold window."""
        if not self._batches:
            return None
        self._taken_at = time.monotonic()
        return self._batches.popleft()

    def _come_back_in(self, now: float, first: bool) -> float | None:
        """For a batch consumer about to wait (under `_cond`): how long it may sleep, as
        the first wait after a take may, before a held batch could be waiting for it;
        None when every push must wake it. Once per take: a consumer that came back and
        found nothing is woken by the next push, so a timer that fires early (uvloop
        rounds to whole milliseconds) costs one empty visit, never a spin. None too while
        batches come further apart than the hold: the visit would come back empty."""
        back = self._taken_at + self._hold_s
        if first and self._hold_s > 0.0 and back > now and self._push_gap < self._hold_s:
            self._back_at = back  # the one value `push` compares with: no rounding gap
            return back - now
        self._back_at = -math.inf
        return None

    def _unwrap(self) -> R:
        outcome = self._outcome
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome  # type: ignore[return-value]

    def _wake(self) -> None:
        self._cond.notify_all()
        wakers, self._wakers = self._wakers, []
        for waker in wakers:
            waker()

    async def _wait_async(self, ready: Callable[[], bool], *, batches: bool = False) -> None:
        """Until `ready()`. `batches`: the batch consumer, which comes back on its own for
        held batches (see `_come_back_in`)."""
        loop = asyncio.get_running_loop()
        first = True
        while True:
            event = asyncio.Event()
            waker = _waker(loop, event)
            with self._cond:
                if ready():
                    return
                self._wakers.append(waker)
                later = self._come_back_in(time.monotonic(), first) if batches else None
                first = False
            timer = None if later is None else loop.call_later(later, event.set)
            try:
                await event.wait()
            finally:
                if timer is not None:
                    timer.cancel()
                # Woken, back on our own or cancelled: a later wake must not call this one.
                with self._cond, contextlib.suppress(ValueError):
                    self._wakers.remove(waker)


def _waker(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> Callable[[], None]:
    def wake() -> None:
        try:
            same_thread = asyncio.get_running_loop() is loop
        except RuntimeError:
            same_thread = False
        if same_thread:  # an I/O task on this loop finished the run: no self-pipe round trip
            event.set()
            return
        # RuntimeError: the loop closed while we waited; nobody is listening.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(event.set)

    return wake
