"""Buckets in Redis, shared by every gateway replica.

One Lua script does both operations: it reads Redis's own clock (`TIME`), so the
replicas' clocks never matter, and it runs atomically, so no two replicas can both
take the last tokens of a bucket. The script is loaded once per server and run by
its SHA (`EVALSHA`; reloaded by itself after Redis restarts without it).

Redis unreachable: the operation raises `StoreUnavailable` at once for a short
back-off, so a request does not wait on a dead server each time; the first
operation after the back-off tries again, which is how limits resume on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import Bucket, Grant, Level, StoreUnavailable

__all__ = ["RedisStore"]

logger = logging.getLogger("sipp.gateway")

RETRY_AFTER_S = 0.5  # after a failure, skip Redis for this long (then try again)

# KEYS: the buckets. ARGV[1]: "r" (reserve: all or none), "a" (adjust: always) or
# "p" (peek: amounts 0, nothing written, so a key stays as it was or absent).
# Then four values per bucket: capacity, period in ms, 1 for a fixed window, amount.
# A bucket hash holds v (level) and m (a window's index, a bucket's last time in ms).
# Returns {ok, retry_ms (-1: never), then per bucket floor(level), reset_ms}.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local reserve = ARGV[1] == 'r'
local write = ARGV[1] ~= 'p'
local n = #KEYS
local levels, marks = {}, {}
local ok, retry = 1, 0
for i = 1, n do
  local b = 1 + (i - 1) * 4
  local cap, period = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local win, amount = ARGV[b + 3] == '1', tonumber(ARGV[b + 4])
  local s = redis.call('HMGET', KEYS[i], 'v', 'm')
  local level = cap
  if win then
    marks[i] = math.floor(now / period)
    if s[1] and tonumber(s[2]) == marks[i] then level = tonumber(s[1]) end
  else
    marks[i] = now
    if s[1] then
      level = math.min(cap, tonumber(s[1]) + (now - tonumber(s[2])) * cap / period)
    end
  end
  levels[i] = level
  if reserve and amount > 0 and level < amount then
    ok = 0
    local wait
    if amount > cap then wait = -1
    elseif win then wait = (marks[i] + 1) * period - now
    else wait = math.ceil((amount - level) * period / cap) end
    if wait < 0 or retry < 0 then retry = -1 elseif wait > retry then retry = wait end
  end
end
local out = {ok, retry}
for i = 1, n do
  local b = 1 + (i - 1) * 4
  local cap, period = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local win, amount = ARGV[b + 3] == '1', tonumber(ARGV[b + 4])
  local level = levels[i]
  local reset
  if ok == 1 then
    level = math.min(cap, level - amount)
    if win then
      reset = (marks[i] + 1) * period - now
    else
      reset = math.ceil((cap - level) * period / cap)
    end
    if write then
      redis.call('HSET', KEYS[i], 'v', tostring(level), 'm', tostring(marks[i]))
      -- once full again the key means nothing: let Redis drop it
      redis.call('PEXPIRE', KEYS[i], reset + 1000)
    end
  elseif win then
    reset = (marks[i] + 1) * period - now
  else
    reset = math.ceil((cap - level) * period / cap)
  end
  out[#out + 1] = math.floor(level)
  out[#out + 1] = math.max(reset, 0)
end
return out
"""


class RedisStore:
    """A pooled asyncio Redis client (hiredis parses replies when installed)."""

    def __init__(self, url: str, *, max_connections: int = 128, timeout_s: float = 1.0) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            # Every connection busy is load, not an outage: wait longer for one than for
            # Redis itself, or a burst would fail open and slip past the limits.
            timeout=5 * timeout_s,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._script = self._redis.register_script(_SCRIPT)
        self._down_until = 0.0
        self.available = True

    @property
    def client(self) -> aioredis.Redis:
        """The pooled client, shared with the response cache's Redis store."""
        return self._redis

    async def _run(self, buckets: Sequence[Bucket], amounts: Sequence[int], mode: str) -> Any:
        if time.monotonic() < self._down_until:
            raise StoreUnavailable("Redis was unreachable moments ago")
        args: list[str | int] = [mode]
        for bucket, amount in zip(buckets, amounts, strict=True):
            args += [bucket.capacity, bucket.period_ms, int(bucket.window), amount]
        try:
            reply = await self._script(keys=[b.key for b in buckets], args=args)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._failed(exc)
            raise StoreUnavailable(str(exc)) from None
        self._recovered()
        return reply

    async def reserve(self, buckets: Sequence[Bucket], amounts: Sequence[int]) -> Grant:
        reply = await self._run(buckets, amounts, "r")
        ok, retry = int(reply[0]) == 1, int(reply[1])
        levels = _levels(reply)
        if ok:
            return Grant(True, levels)
        return Grant(False, levels, None if retry < 0 else math.ceil(retry) / 1000.0)

    async def adjust(self, buckets: Sequence[Bucket], deltas: Sequence[int]) -> None:
        await self._run(buckets, deltas, "a")

    async def peek(self, buckets: Sequence[Bucket]) -> tuple[Level, ...]:
        return _levels(await self._run(buckets, [0] * len(buckets), "p"))

    async def fields(self, key: str) -> dict[str, str]:
        """The fields of hash `key`."""
        async with self._guard():
            reply = await self._redis.hgetall(key)
        return {_text(k): _text(v) for k, v in reply.items()}

    async def set_field(self, key: str, field: str, value: str | None) -> None:
        """Set a field of hash `key`, or delete it when `value` is None."""
        async with self._guard():
            if value is None:
                await self._redis.hdel(key, field)
            else:
                await self._redis.hset(key, field, value)

    async def members(self, keys: Sequence[str]) -> list[set[str]]:
        """The members of each set in `keys` (one round trip)."""
        async with self._guard(), self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.smembers(key)
            replies = await pipe.execute()
        return [{_text(m) for m in r} for r in replies]

    async def set_member(self, key: str, member: str, present: bool) -> None:
        async with self._guard():
            if present:
                await self._redis.sadd(key, member)
            else:
                await self._redis.srem(key, member)

    async def push_capped(self, key: str, value: str, cap: int) -> None:
        """Put `value` at the head of list `key`, keeping its `cap` newest (one MULTI)."""
        async with self._guard(), self._redis.pipeline(transaction=True) as pipe:
            pipe.lpush(key, value)
            pipe.ltrim(key, 0, cap - 1)
            await pipe.execute()

    async def head(self, key: str, count: int) -> list[str]:
        """The first `count` items of list `key`."""
        async with self._guard():
            reply = await self._redis.lrange(key, 0, count - 1)
        return [_text(item) for item in reply]

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        """Redis failures as `StoreUnavailable`, with the back-off `_run` keeps."""
        if time.monotonic() < self._down_until:
            raise StoreUnavailable("Redis was unreachable moments ago")
        try:
            yield
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._failed(exc)
            raise StoreUnavailable(str(exc)) from None
        self._recovered()

    def _failed(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + RETRY_AFTER_S
        if self.available:
            logger.error("state store (Redis) unavailable: %s", type(exc).__name__)
        self.available = False

    def _recovered(self) -> None:
        if not self.available:
            logger.info("state store (Redis) available again")
        self.available = True

    async def ping(self) -> bool:
        try:
            up = bool(await self._redis.ping())
        except (RedisError, OSError, asyncio.TimeoutError):
            up = False
        self.available = up
        if up:
            self._down_until = 0.0
        return up

    async def close(self) -> None:
        await self._redis.aclose()


def _levels(reply: Any) -> tuple[Level, ...]:
    """The script's per-bucket (level, reset ms) pairs after its first two values."""
    return tuple(
        Level(float(reply[i]), int(reply[i + 1]) / 1000.0) for i in range(2, len(reply), 2)
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
