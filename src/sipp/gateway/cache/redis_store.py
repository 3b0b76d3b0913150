"""Cache entries in the `[state]` Redis, shared by every replica.

Per target, under `<key_prefix>:cache:<target>:`: each value is a string with Redis's
own expiry (`PX`: absolute, a hit never touches it); a sorted set orders entries by last
use (Redis's clock, updated on each hit), another by expiry, a hash holds each entry's
size and one more the totals. A Lua script stores an entry, drops the bookkeeping of
expired ones and evicts the least recently used until the caps hold, atomically, so
two replicas storing at once cannot pass a cap. Redis unreachable: the operation fails
at once for a short back-off (the request is served uncached) instead of each request
waiting on a dead server.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .store import CacheStoreError, Totals

__all__ = ["RedisCacheStore"]

RETRY_AFTER_S = 0.5

_GET = """
local v = redis.call('GET', KEYS[1])
if v then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], 'XX', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
end
return v
"""

# KEYS: value, lru, expiry, sizes, totals. ARGV: member, value, ttl ms, max entries,
# max bytes, the prefix of value keys. Returns {entries, bytes}.
_PUT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member, value, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local max_n, max_b, prefix = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local function drop(m)
  local size = redis.call('HGET', KEYS[4], m)
  if size then
    redis.call('HDEL', KEYS[4], m)
    redis.call('HINCRBY', KEYS[5], 'entries', -1)
    redis.call('HINCRBY', KEYS[5], 'bytes', -tonumber(size))
  end
  redis.call('ZREM', KEYS[2], m)
  redis.call('ZREM', KEYS[3], m)
  redis.call('DEL', prefix .. m)
end
local function totals()
  local v = redis.call('HMGET', KEYS[5], 'entries', 'bytes')
  return tonumber(v[1] or '0'), tonumber(v[2] or '0')
end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 256)) do
  drop(m)
end
drop(member)
local size = string.len(value)
if size <= max_b then
  redis.call('SET', KEYS[1], value, 'PX', ttl)
  redis.call('ZADD', KEYS[2], now, member)
  redis.call('ZADD', KEYS[3], now + ttl, member)
  redis.call('HSET', KEYS[4], member, size)
  redis.call('HINCRBY', KEYS[5], 'entries', 1)
  redis.call('HINCRBY', KEYS[5], 'bytes', size)
end
local n, b = totals()
while n > max_n or b > max_b do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then break end
  drop(oldest[1])
  n, b = totals()
end
return {n, b}
"""

# KEYS: lru, expiry, sizes, totals. ARGV: the prefix of value keys. Returns the entries
# removed (every entry has its member in the LRU set until it is dropped).
_CLEAR = """
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, m in ipairs(members) do
  redis.call('DEL', ARGV[1] .. m)
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return #members
"""


class RedisCacheStore:
    """One target's cache over a shared Redis client (the `[state]` store's pool)."""

    def __init__(
        self, client: aioredis.Redis, prefix: str, max_entries: int, max_bytes: int
    ) -> None:
        self._redis, self.max_entries, self.max_bytes = client, max_entries, max_bytes
        self._keys = [f"{prefix}:{name}" for name in ("lru", "exp", "size", "tot")]
        self._values = f"{prefix}:e:"
        self._get = client.register_script(_GET)
        self._put = client.register_script(_PUT)
        self._clear = client.register_script(_CLEAR)
        self._down_until = 0.0

    async def _call(self, work: Any) -> Any:
        if time.monotonic() < self._down_until:
            raise CacheStoreError("Redis was unreachable moments ago")
        try:
            return await work
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._down_until = time.monotonic() + RETRY_AFTER_S
            raise CacheStoreError(type(exc).__name__) from None

    async def get(self, key: str) -> bytes | None:
        value = await self._call(self._get(keys=[self._values + key, self._keys[0]], args=[key]))
        return None if value is None else bytes(value)

    async def put(self, key: str, value: bytes, ttl_seconds: float) -> Totals:
        args: list[bytes | str | int] = [key, value, int(ttl_seconds * 1000)]
        args += [self.max_entries, self.max_bytes]
        reply = await self._call(
            self._put(keys=[self._values + key, *self._keys], args=[*args, self._values])
        )
        return Totals(int(reply[0]), int(reply[1]))

    async def totals(self) -> Totals:
        entries, size = await self._call(self._redis.hmget(self._keys[3], "entries", "bytes"))
        return Totals(int(entries or 0), int(size or 0))

    async def clear(self) -> int:
        return int(await self._call(self._clear(keys=self._keys, args=[self._values])))

    async def close(self) -> None:
        """Nothing to close: the client belongs to the `[state]` store."""
