"""Where limits keep their counts, behind one async interface.

A limit is a `Bucket`: a token bucket refilled continuously (`capacity` per
`period_ms`), or a fixed window (`capacity` per window of `period_ms`, aligned to
the epoch, so a day window is a UTC day). A bucket's level is what it has left.

`reserve` takes an amount from every bucket at once or from none (one atomic step,
so concurrent requests cannot slip past a limit between a check and a charge);
`adjust` settles afterwards: a positive delta charges more, a negative one refunds
(never above capacity; a charge may leave a bucket in debt, which its refill pays
off), and `peek` reads levels without touching them. `memory.MemoryStore` is one process's; `redis.RedisStore` is shared by every
replica and runs both steps as Lua scripts on Redis's own clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Bucket", "Grant", "Level", "Store", "StoreUnavailable"]


@dataclass(frozen=True, slots=True)
class Bucket:
    key: str
    capacity: int
    period_ms: int
    window: bool = False  # a fixed window instead of a continuously refilled bucket


@dataclass(frozen=True, slots=True)
class Level:
    """A bucket after the operation: what it has left and in how many seconds it is full
    again (a window: when it starts over)."""

    remaining: float
    reset_s: float


@dataclass(frozen=True, slots=True)
class Grant:
    """`ok`: every amount was taken. Refused: `retry_after` seconds until every bucket
    could cover its amount, None when one never can (the amount exceeds its capacity)."""

    ok: bool
    levels: tuple[Level, ...]
    retry_after: float | None = None


class StoreUnavailable(Exception):
    """The shared state could not be reached; the limits' `on_unavailable` policy decides."""


class Store(Protocol):
    @property
    def available(self) -> bool: ...

    async def reserve(self, buckets: Sequence[Bucket], amounts: Sequence[int]) -> Grant: ...

    async def adjust(self, buckets: Sequence[Bucket], deltas: Sequence[int]) -> None: ...

    async def peek(self, buckets: Sequence[Bucket]) -> tuple[Level, ...]:
        """Each bucket's level now, changing nothing (the admin dashboard reads them)."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...
