"""Stopping a replica's background loops (shared controls, semantic-record reading,
target loading) when it shuts down."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["stop_loop"]

# How long a cancelled loop gets to end before it is cancelled again.
RECANCEL_S = 0.5


async def stop_loop(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and wait until it has ended, whatever it raised.

    One cancel is not always enough: a library under the loop can swallow it. Python
    3.11's `asyncio.wait_for` returns the inner result when that finishes in the same
    step as the cancel, and redis-py sends every command through it; the loop then
    sleeps and polls again, and a shutdown waiting for it never ends. So the task is
    cancelled again until it stops."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_S)
    if not task.cancelled():
        task.exception()  # retrieved: an error it ended with is not logged as unhandled
