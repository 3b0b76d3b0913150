"""Where cache entries live, behind one async interface.

A store belongs to one target's cache and holds its caps: every entry has an absolute
expiry (a hit never extends it) and the store keeps at most `max_entries` entries and
`max_bytes` bytes of values, evicting the least recently used first (a hit counts as
a use). `SqliteStore` is one host's file, kept across restarts; `RedisCacheStore`
is shared by every replica using the `[state]` Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["CacheStore", "CacheStoreError", "Totals"]


@dataclass(frozen=True, slots=True)
class Totals:
    """What a store holds now (expired entries included until they are swept)."""

    entries: int
    bytes: int


class CacheStoreError(Exception):
    """The store could not be read or written: the request is served uncached."""


class CacheStore(Protocol):
    async def get(self, key: str) -> bytes | None:
        """The value stored under `key` if it has not expired; marks it used."""
        ...

    async def put(self, key: str, value: bytes, ttl_seconds: float) -> Totals:
        """Store `value` for `ttl_seconds` from now (replacing any entry of `key`), evict
        until the caps hold, and say what the store holds then."""
        ...

    async def totals(self) -> Totals: ...

    async def clear(self) -> int:
        """Remove every entry (an operator's purge); how many there were."""
        ...

    async def close(self) -> None: ...
