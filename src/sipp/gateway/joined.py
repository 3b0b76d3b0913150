"""A streamed run's batches with those already waiting joined into one.

A local engine hands text over a few tokens at a time (`RunChannel.push`'s hold), so
a stream that wakes finds several batches queued. Sent as they are, each becomes its
own frame, its own socket write (the largest single cost of a wake's Python, measured
in the loop's profile) and its own event for the client to parse. Joined, a wake
sends one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace

from .._types import TokenBatch

__all__ = ["joined"]

# A producer that keeps the queue full would otherwise keep its text from the client
# (and the loop busy) for as long as it does.
MAX_JOINED = 64


def _join(batches: Sequence[TokenBatch], sequence: int) -> TokenBatch:
    """One batch with the text, token ids and logprobs of `batches`, in order."""
    if len(batches) == 1:
        only = batches[0]
        return only if only.sequence == sequence else replace(only, sequence=sequence)
    return TokenBatch(
        "".join(b.text for b in batches),
        tuple(t for b in batches for t in b.token_ids),
        sequence,
        tuple(lp for b in batches for lp in b.logprobs),
    )


def _joinable(batch: TokenBatch) -> bool:
    # Tool-call deltas keep a frame each (a client accumulates them one by one), and a
    # remote delta without token ids is counted from its own text, so it stays whole.
    return bool(batch.token_ids) and not batch.tool_calls


async def joined(
    batches: AsyncIterator[TokenBatch], waiting: Callable[[], bool]
) -> AsyncIterator[TokenBatch]:
    """`batches`, where each text batch is joined with those `waiting()` says are already
    queued behind it (at most `MAX_JOINED`). Sequence numbers are renumbered from 0, so
    they stay contiguous.

    `waiting()` true means the next batch comes without a wait: text is held back only
    while its successor is already there. Should the source fail instead, the text held
    goes out before the error does."""
    held: list[TokenBatch] = []
    sequence = 0
    try:
        async for batch in batches:
            if not _joinable(batch):
                if held:
                    yield _join(held, sequence)
                    sequence, held = sequence + 1, []
                yield _join([batch], sequence)
                sequence += 1
                continue
            held.append(batch)
            if len(held) >= MAX_JOINED or not waiting():
                yield _join(held, sequence)
                sequence, held = sequence + 1, []
    except Exception:
        if held:
            yield _join(held, sequence)
        raise
    if held:
        yield _join(held, sequence)
