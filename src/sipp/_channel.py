"""`RunChannel`: the one hand-off between an engine thread and a run handle.

The engine (a worker thread for local models, an HTTP call for remote ones)
pushes token batches and then exactly one outcome. Sync handles block on a
condition variable; async handles are woken with `call_soon_threadsafe`, so
both twins read the same object and behave identically.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
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

    # -- producer side (engine) ---------------------------------------------
    def push(self, batch: TokenBatch) -> None:
        with self._cond:
            self._batches.append(batch)
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
        with self._cond:
            if not self._cond.wait_for(lambda: self._batches or self.done, timeout):
                raise TimeoutError("no token batch within the timeout")
            return self._batches.popleft() if self._batches else None

    def outcome(self, timeout: float | None = None) -> R:
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError("the run did not finish within the timeout")
            return self._unwrap()

    async def next_batch_async(self) -> TokenBatch | None:
        await self._wait_async(lambda: bool(self._batches) or self.done)
        with self._cond:
            return self._batches.popleft() if self._batches else None

    async def accepted_async(self) -> None:
        await self._wait_async(lambda: not self._preparing or self.done)

    async def outcome_async(self) -> R:
        await self._wait_async(lambda: self.done)
        with self._cond:
            return self._unwrap()

    # -- internals --------------------------------------------------------------
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

    async def _wait_async(self, ready: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            event = asyncio.Event()
            with self._cond:
                if ready():
                    return
                self._wakers.append(_waker(loop, event))
            await event.wait()


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
