"""RunChannel's held batches: a producer on another thread that pushes with `hold_s` does
not wake a consumer that has a visit due (set when it took a batch and found no more,
while batches come faster than the hold); the visit delivers the batch. Real threads and a real event loop; no timing is asserted,
only what arrives and whether the push woke anyone (a waking push empties the waker
list)."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable

import pytest

from sipp._channel import RunChannel
from sipp._types import TokenBatch

LONG_S = 3600.0  # a hold no test outlives: a batch held this long arrives only if woken
SHORT_S = 0.5  # a hold the consumer's own visit ends; far longer than starting a thread


def _batch(i: int) -> TokenBatch:
    return TokenBatch(f"t{i}", (i,), i)


def _until(condition: Callable[[], bool]) -> None:
    """Wait for another thread or task to reach a state (not a timing assertion)."""
    for _ in range(30_000):
        if condition():
            return
        time.sleep(0.001)
    raise AssertionError("the state was never reached")


async def _until_async(condition: Callable[[], bool]) -> None:
    for _ in range(30_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the state was never reached")


def _from_thread(fn: Callable[[], None]) -> None:
    """Run `fn` on another thread, as an engine pushes, and wait for it."""
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join()


def _push_two(channel: RunChannel[str], hold_s: float) -> None:
    """Batches 0 and 1, back to back: they come faster than any hold, so a consumer that
    takes them sets itself a visit."""
    channel.push(_batch(0), hold_s=hold_s)
    channel.push(_batch(1), hold_s=hold_s)


def test_a_held_push_leaves_an_async_consumer_asleep_until_a_waking_push() -> None:
    async def main() -> None:
        channel: RunChannel[str] = RunChannel()
        _push_two(channel, LONG_S)  # nothing taken yet: wakes
        assert (await channel.next_batch_async()) == _batch(0)
        assert (await channel.next_batch_async()) == _batch(1)
        waiting = asyncio.create_task(channel.next_batch_async())
        await _until_async(lambda: len(channel._wakers) == 1)
        _from_thread(lambda: channel.push(_batch(2), hold_s=LONG_S))
        assert len(channel._wakers) == 1  # held: nobody was called
        assert not waiting.done()
        _from_thread(lambda: channel.push(_batch(3)))  # no hold: wakes
        assert (await asyncio.wait_for(waiting, 30)) == _batch(2)
        assert (await channel.next_batch_async()) == _batch(3)

    asyncio.run(main())


def test_a_sync_consumer_comes_back_for_a_held_batch_on_its_own() -> None:
    channel: RunChannel[str] = RunChannel()
    _push_two(channel, SHORT_S)
    assert channel.next_batch() == _batch(0)
    assert channel.next_batch() == _batch(1)
    got: list[TokenBatch | None] = []
    consumer = threading.Thread(target=lambda: got.append(channel.next_batch()))  # no timeout
    consumer.start()
    _until(lambda: len(channel._cond._waiters) == 1)  # type: ignore[attr-defined]
    channel.push(_batch(2), hold_s=SHORT_S)
    assert len(channel._cond._waiters) == 1  # type: ignore[attr-defined]  # held: not notified
    consumer.join(30)
    if consumer.is_alive():  # stranded: free the thread, then fail
        channel.finish("stranded")
        consumer.join()
    assert got == [_batch(2)]


@pytest.mark.parametrize(
    ("first_hold", "second_hold", "woken"),
    [
        # The first batch: nothing was taken, so no visit is due (the gateway's wait for
        # a stream's first token counts on it).
        (None, LONG_S, True),
        # Pushed while a visit is due: left for the visit, which alone delivers it.
        (SHORT_S, SHORT_S, False),
        # The visit is once per take: a consumer that came back to nothing waits without
        # a timer, so a held push would strand it.
        (SHORT_S, SHORT_S, True),
        # A consumer that waits with no visit due (its batches came with no hold) is woken
        # by a push with a hold, whatever the hold.
        (0.0, LONG_S, True),
    ],
    ids=["the-first-batch", "during-a-visit", "after-an-empty-visit", "a-longer-hold"],
)
def test_a_held_push_wakes_only_a_consumer_with_no_visit_due(
    first_hold: float | None, second_hold: float, woken: bool
) -> None:
    async def main() -> None:
        channel: RunChannel[str] = RunChannel()
        if first_hold is not None:
            _push_two(channel, first_hold)
            assert (await channel.next_batch_async()) == _batch(0)
            assert (await channel.next_batch_async()) == _batch(1)
        waiting = asyncio.create_task(channel.next_batch_async())
        if woken:  # no visit due any more
            await _until_async(lambda: channel._back_at == -math.inf and len(channel._wakers) == 1)
        else:
            await _until_async(lambda: len(channel._wakers) == 1)
        _from_thread(lambda: channel.push(_batch(2), hold_s=second_hold))
        assert len(channel._wakers) == (0 if woken else 1)  # a wake calls and drops wakers
        assert (await asyncio.wait_for(waiting, 30)) == _batch(2)
        assert channel._wakers == []  # a visit takes its waker back

    asyncio.run(main())


def test_batches_further_apart_than_the_hold_wake_the_consumer_each_time() -> None:
    """Eight streams sharing an engine step each get a token a step, more than the hold
    apart. A visit set after a take would come back to nothing, and the next push would
    have to wake the consumer anyway: it sets none, and that push wakes it."""

    async def main() -> None:
        channel: RunChannel[str] = RunChannel()
        hold_s = 0.2
        channel.push(_batch(1), hold_s=hold_s)
        assert (await channel.next_batch_async()) == _batch(1)
        await asyncio.sleep(1.5 * hold_s)  # the next batch comes later than the hold
        channel.push(_batch(2), hold_s=hold_s)
        assert (await channel.next_batch_async()) == _batch(2)
        waiting = asyncio.create_task(channel.next_batch_async())
        await _until_async(lambda: len(channel._wakers) == 1)
        assert channel._back_at == -math.inf  # no visit due
        _from_thread(lambda: channel.push(_batch(3), hold_s=hold_s))
        assert channel._wakers == []  # woken at once
        assert (await asyncio.wait_for(waiting, 30)) == _batch(3)

    asyncio.run(main())


def test_held_batches_come_before_the_outcome_and_the_outcome_wakes() -> None:
    async def main() -> None:
        channel: RunChannel[str] = RunChannel()
        channel.push(_batch(1), hold_s=LONG_S)
        assert (await channel.next_batch_async()) == _batch(1)
        outcome = asyncio.create_task(channel.outcome_async())
        batches = asyncio.create_task(channel.next_batch_async())
        await _until_async(lambda: len(channel._wakers) == 2)

        def produce() -> None:
            channel.push(_batch(2), hold_s=LONG_S)
            channel.push(_batch(3), hold_s=LONG_S)
            channel.finish("done")

        _from_thread(produce)
        assert (await asyncio.wait_for(outcome, 30)) == "done"
        assert (await asyncio.wait_for(batches, 30)) == _batch(2)
        assert (await channel.next_batch_async()) == _batch(3)
        assert (await channel.next_batch_async()) is None

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_no_waker_behind() -> None:
    async def main() -> None:
        channel: RunChannel[str] = RunChannel()
        for wait in (channel.next_batch_async(), channel.outcome_async()):
            task = asyncio.create_task(wait)
            await _until_async(lambda: len(channel._wakers) == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert channel._wakers == []

    asyncio.run(main())


def test_a_sync_timeout_still_applies_while_a_hold_is_in_force() -> None:
    channel: RunChannel[str] = RunChannel()
    channel.push(_batch(1), hold_s=LONG_S)
    assert channel.next_batch(timeout=30) == _batch(1)
    with pytest.raises(TimeoutError):
        channel.next_batch(timeout=0.01)
