"""One process's buckets: the embedded default, the same rules as the Redis scripts."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from . import Bucket, Grant, Level

__all__ = ["MemoryStore"]


class MemoryStore:
    """Buckets in a dict. Keys are configured caller labels and targets, so the dict is
    bounded by the configuration. No await inside an operation: each is atomic on the
    event loop."""

    available = True

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock  # seconds; wall time, so day windows are UTC days
        self._state: dict[str, tuple[float, float]] = {}  # key -> (level, mark)

    def _now_ms(self) -> float:
        return self._clock() * 1000.0

    def _level(self, bucket: Bucket, now: float) -> tuple[float, float]:
        """The bucket's level at `now` and its mark (a window's index, a bucket's time)."""
        cap, period = bucket.capacity, bucket.period_ms
        stored = self._state.get(bucket.key)
        if bucket.window:
            index = math.floor(now / period)
            if stored is not None and stored[1] == index:
                return stored[0], index
            return float(cap), index
        if stored is None:
            return float(cap), now
        return min(float(cap), stored[0] + (now - stored[1]) * cap / period), now

    @staticmethod
    def _reset_s(bucket: Bucket, level: float, mark: float, now: float) -> float:
        if bucket.window:
            return ((mark + 1) * bucket.period_ms - now) / 1000.0
        return max(0.0, (bucket.capacity - level) * bucket.period_ms / bucket.capacity / 1000.0)

    def _apply(
        self, buckets: Sequence[Bucket], amounts: Sequence[int], reserve: bool, write: bool = True
    ) -> Grant:
        now = self._now_ms()
        current = [self._level(b, now) for b in buckets]
        retry: float | None = 0.0
        ok = True
        if reserve:
            for bucket, (level, mark), amount in zip(buckets, current, amounts, strict=True):
                if amount <= 0 or level >= amount:
                    continue
                ok = False
                if amount > bucket.capacity:
                    wait: float | None = None
                elif bucket.window:
                    wait = ((mark + 1) * bucket.period_ms - now) / 1000.0
                else:
                    wait = (amount - level) * bucket.period_ms / bucket.capacity / 1000.0
                retry = None if wait is None or retry is None else max(retry, wait)
        levels = []
        for bucket, (level, mark), amount in zip(buckets, current, amounts, strict=True):
            if ok and write:
                level = min(float(bucket.capacity), level - amount)
                self._state[bucket.key] = (level, mark)
            levels.append(Level(level, self._reset_s(bucket, level, mark, now)))
        return Grant(ok, tuple(levels), None if ok else retry)

    async def reserve(self, buckets: Sequence[Bucket], amounts: Sequence[int]) -> Grant:
        return self._apply(buckets, amounts, reserve=True)

    async def adjust(self, buckets: Sequence[Bucket], deltas: Sequence[int]) -> None:
        self._apply(buckets, deltas, reserve=False)

    async def peek(self, buckets: Sequence[Bucket]) -> tuple[Level, ...]:
        return self._apply(buckets, [0] * len(buckets), reserve=False, write=False).levels

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        pass
