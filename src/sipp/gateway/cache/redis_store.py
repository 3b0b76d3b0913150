"""Cache entries in the `[state]` Redis, shared by every replica.

Per target, under `<key_prefix>:cache:<target>:`: each value is a string with Redis's
own expiry (`PX`: absolute, a hit never touches it); a sorted set orders entries by last
use (Redis's clock, updated on each hit), another by expiry, a hash holds each entry's
size and one more the totals. A Lua script stores an entry, drops the bookkeeping of
expired ones and evicts the least recently used until the caps hold, atomically, so
two replicas storing at once cannot pass a cap. Redis unreachable: the operation fails
at once for a short back-off (the request is served uncached) instead of each request
waiting on a dead server.

Semantic records live under `sem:<model tag>:` (a hash of the embedding model's id, so
replicas on another model never read them): each record is a string with the entry's
expiry, numbered by a per-model counter in a sorted set (`s`, member -> number), and a
hash maps each member to its model tag so dropping an entry drops its record, all in
the same scripts. A replica reads the set from the start at startup, then polls it
from the last number it saw (`records`): state, not messages, so a replica that was
down or slow misses nothing, and no connection is held per replica.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .entry import SemanticRecord, decode_record, encode_record
from .store import CacheStoreError, RecordPage, StoredRecord, Totals

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

# KEYS: value, lru, expiry, sizes, totals, member -> model tag. ARGV: member, value,
# ttl ms, max entries, max bytes, the prefix of value keys, the semantic record ('' for
# none), its model tag, the prefix of semantic keys. Returns {entries, bytes}.
_PUT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member, value, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local max_n, max_b, prefix = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local record, tag, sem = ARGV[7], ARGV[8], ARGV[9]
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
  local of = redis.call('HGET', KEYS[6], m)
  if of then
    redis.call('HDEL', KEYS[6], m)
    redis.call('ZREM', sem .. of .. ':s', m)
    redis.call('DEL', sem .. of .. ':r:' .. m)
  end
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
  if record ~= '' then
    local seq = redis.call('INCR', sem .. tag .. ':n')
    if seq == 1 then redis.call('SET', sem .. tag .. ':epoch', now) end
    redis.call('SET', sem .. tag .. ':r:' .. member, record, 'PX', ttl)
    redis.call('ZADD', sem .. tag .. ':s', seq, member)
    redis.call('HSET', KEYS[6], member, tag)
  end
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

# KEYS: lru, expiry, sizes, totals, member -> model tag. ARGV: the prefix of value keys,
# the prefix of semantic keys. Returns the entries removed (every entry has its member in
# the LRU set until it is dropped). The semantic counters stay: replicas follow by them.
_CLEAR = """
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, m in ipairs(members) do
  redis.call('DEL', ARGV[1] .. m)
  local of = redis.call('HGET', KEYS[5], m)
  if of then
    redis.call('ZREM', ARGV[2] .. of .. ':s', m)
    redis.call('DEL', ARGV[2] .. of .. ':r:' .. m)
  end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return #members
"""

# KEYS: a model's numbered set, the expiry set, when the model's counter started. ARGV:
# the number to read after, how many, the prefix of that model's record keys. Returns
# {now ms, the counter's start, then per member: member, number, record or nil (expired,
# not swept yet), expiry ms or nil}.
_SINCE = """
local t = redis.call('TIME')
local out = {tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
out[2] = redis.call('GET', KEYS[3]) or ''
local page = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'WITHSCORES',
  'LIMIT', 0, tonumber(ARGV[2]))
for i = 1, #page, 2 do
  local m = page[i]
  out[#out + 1] = m
  out[#out + 1] = page[i + 1]
  out[#out + 1] = redis.call('GET', ARGV[3] .. m)
  out[#out + 1] = redis.call('ZSCORE', KEYS[2], m)
end
return out
"""


def model_tag(model: str) -> str:
    """The key-safe name of an embedding model id."""
    return hashlib.sha256(model.encode("utf-8")).hexdigest()[:16]


class RedisCacheStore:
    """One target's cache over a shared Redis client (the `[state]` store's pool)."""

    def __init__(
        self, client: aioredis.Redis, prefix: str, max_entries: int, max_bytes: int
    ) -> None:
        self._redis, self.max_entries, self.max_bytes = client, max_entries, max_bytes
        self._keys = [f"{prefix}:{name}" for name in ("lru", "exp", "size", "tot", "semof")]
        self._values = f"{prefix}:e:"
        self._semantic = f"{prefix}:sem:"
        self._get = client.register_script(_GET)
        self._put = client.register_script(_PUT)
        self._clear = client.register_script(_CLEAR)
        self._since = client.register_script(_SINCE)
        self._epochs: dict[str, bytes] = {}  # model -> when its numbering started
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

    @property
    def shared(self) -> bool:
        return True

    async def put(
        self, key: str, value: bytes, ttl_seconds: float, record: SemanticRecord | None = None
    ) -> Totals:
        args: list[bytes | str | int] = [key, value, int(ttl_seconds * 1000)]
        args += [self.max_entries, self.max_bytes, self._values]
        if record is not None:
            args += [encode_record(record), model_tag(record.model), self._semantic]
        else:
            args += ["", "", self._semantic]
        reply = await self._call(self._put(keys=[self._values + key, *self._keys], args=args))
        return Totals(int(reply[0]), int(reply[1]))

    async def records(self, model: str, after: int = 0, limit: int = 2000) -> RecordPage:
        tag = f"{self._semantic}{model_tag(model)}"
        keys = [f"{tag}:s", self._keys[1], f"{tag}:epoch"]
        reply = await self._call(self._since(keys=keys, args=[after, limit, f"{tag}:r:"]))
        # Numbers restart when Redis lost its data (restarted empty, flushed): then the
        # records are read again from the first.
        epoch, seen = bytes(reply[1]), self._epochs.get(model)
        self._epochs[model] = epoch
        if after and seen is not None and epoch != seen:
            return await self.records(model, 0, limit)
        now, found, cursor = int(reply[0]), [], after
        for i in range(2, len(reply), 4):
            member, number, raw, expires = reply[i : i + 4]
            cursor = int(float(number))
            record = decode_record(bytes(raw)) if raw is not None else None
            if record is None or record.model != model or expires is None:
                continue
            left = (float(expires) - now) / 1000
            if left > 0:
                found.append(StoredRecord(bytes(member).decode("utf-8"), record, left))
        return RecordPage(found, cursor)

    async def totals(self) -> Totals:
        entries, size = await self._call(self._redis.hmget(self._keys[3], "entries", "bytes"))
        return Totals(int(entries or 0), int(size or 0))

    async def clear(self) -> int:
        return int(
            await self._call(self._clear(keys=self._keys, args=[self._values, self._semantic]))
        )

    async def close(self) -> None:
        """Nothing to close: the client belongs to the `[state]` store."""
