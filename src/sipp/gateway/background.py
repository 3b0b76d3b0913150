"""Stopping a replica's background loops (shared controls, semantic-record reading,
target loading, cache verifications) when it shuts down."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["stop_loop"]

logger = logging.getLogger("sipp.gateway")

# How long a cancelled loop gets to end before it is cancelled again.
RECANCEL_S = 0.5
# Cancels after which a loop that still runs is named in the log.
WARN_AFTER = 10


async def stop_loop(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and wait until it has ended; an error it ended with is logged.

    One cancel is not always enough: a library under the loop can swallow it. Before
    Python 3.12, `asyncio.wait_for` returns the inner result when that finishes in the
    same step as the cancel, and redis-py sends every command through it; the loop then
    sleeps and polls again, and a shutdown waiting for it never ends. So the task is
    cancelled again every `RECANCEL_S` until it stops. (A cleanup of the task's own that
    awaits longer than that is cut short: the loops this is for have none.)"""
    cancels = 0
    while not task.done():
        task.cancel()
        cancels += 1
        if cancels == WARN_AFTER:
            logger.warning("background task %r still runs after %d cancels", task, cancels)
        await asyncio.wait({task}, timeout=RECANCEL_S)
    if not task.cancelled() and (error := task.exception()) is not None:
        logger.error("background task %r had failed", task, exc_info=error)
