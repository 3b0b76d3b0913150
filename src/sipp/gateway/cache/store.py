"""Where cache entries live, behind one async interface.

A store belongs to one target's cache and holds its caps: every entry has an absolute
expiry (a hit never extends it) and the store keeps at most `max_entries` entries and
`max_bytes` bytes of values, evicting the least recently used first (a hit counts as
a use). `SqliteStore` is one host's file, kept across restarts; `RedisCacheStore`
is shared by every replica using the `[state]` Redis.

An entry may carry its `SemanticRecord`: the store writes it with the entry and drops
it with the entry (eviction, expiry, replacement), so the semantic index is rebuilt
from `records` at startup, and replicas sharing a store read each other's additions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

from .entry import SemanticRecord

__all__ = ["CacheStore", "CacheStoreError", "RecordPage", "StoredRecord", "Totals"]


@dataclass(frozen=True, slots=True)
class Totals:
    """What a store holds now (expired entries included until they are swept)."""

    entries: int
    bytes: int


class StoredRecord(NamedTuple):
    key: str  # the entry's exact key
    record: SemanticRecord
    ttl_left: float  # seconds until the entry expires


@dataclass(frozen=True, slots=True)
class RecordPage:
    records: list[StoredRecord]
    cursor: int  # pass as `after` to read the records stored since this page


class CacheStoreError(Exception):
    """The store could not be read or written: the request is served uncached."""


class CacheStore(Protocol):
    async def get(self, key: str) -> bytes | None:
        """The value stored under `key` if it has not expired; marks it used."""
        ...

    async def put(
        self, key: str, value: bytes, ttl_seconds: float, record: SemanticRecord | None = None
    ) -> Totals:
        """Store `value` (and its semantic `record`) for `ttl_seconds` from now, replacing
        any entry of `key`, evict until the caps hold, and say what the store holds then."""
        ...

    async def records(self, model: str, after: int = 0, limit: int = 2000) -> RecordPage:
        """Up to `limit` semantic records of embedding model `model` whose entries are
        alive, in the order they were stored, from after cursor `after` (0: the first)."""
        ...

    @property
    def shared(self) -> bool:
        """Whether other processes add entries too (their records are then followed)."""
        ...

    async def totals(self) -> Totals: ...

    async def clear(self) -> int:
        """Remove every entry (an operator's purge); how many there were."""
        ...

    async def close(self) -> None: ...
