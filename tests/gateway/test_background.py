"""`stop_loop` ends a replica's background loop even when a library under it swallows
the cancel: the cause of a replica that took SIGTERM and never exited."""

from __future__ import annotations

import asyncio
import logging

import pytest

from sipp.gateway.background import stop_loop


def test_a_cancel_swallowed_by_wait_for_does_not_keep_the_loop_running() -> None:
    async def main() -> None:
        replies: list[asyncio.Future[None]] = []

        async def poll() -> None:  # what redis-py does for each command it sends
            while True:
                reply = asyncio.get_running_loop().create_future()
                replies.append(reply)
                await asyncio.wait_for(reply, timeout=10)
                await asyncio.sleep(0.01)

        async def answer() -> None:  # a server that answers every poll at once
            while True:
                for reply in replies:
                    if not reply.done():
                        reply.set_result(None)
                await asyncio.sleep(0)

        task = asyncio.create_task(poll())
        while not replies:
            await asyncio.sleep(0)
        server = asyncio.create_task(answer())
        # The reply arrives in the same step as the cancel: Python 3.11's wait_for
        # returns the reply and the cancel is lost.
        replies[0].set_result(None)
        await asyncio.wait_for(stop_loop(task), timeout=60)  # a regression fails, not hangs
        server.cancel()
        assert task.cancelled()

    asyncio.run(main())


def test_a_loop_that_ignores_cancels_is_cancelled_until_it_ends() -> None:
    async def main() -> None:
        ignored = 0

        async def stubborn() -> None:
            nonlocal ignored
            while True:
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    ignored += 1
                    if ignored == 3:
                        raise

        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        await stop_loop(task)
        assert task.cancelled() and ignored == 3

    asyncio.run(main())


def test_a_loop_that_ended_with_an_error_is_stopped_and_its_error_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async def broken() -> None:
            raise RuntimeError("a bug in the loop")

        task = asyncio.create_task(broken())
        await asyncio.sleep(0)
        await stop_loop(task)  # nothing raised

    with caplog.at_level(logging.ERROR, logger="sipp.gateway"):
        asyncio.run(main())
    [record] = caplog.records
    assert "had failed" in record.getMessage()
    assert record.exc_info is not None and "a bug in the loop" in str(record.exc_info[1])
