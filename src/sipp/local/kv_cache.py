"""KV reuse bookkeeping: token prefixes and the host-memory snapshot store.

Embeddings have no KV worth keeping (every input is pooled whole), so their
`context_key` keeps the result instead: `EmbedMemo` answers the same input under
the same key without running the model again.

A snapshot is one sequence's KV state (`llama_state_seq_get_data`) taken when
its slot is handed to an unrelated request, kept with the tokens it encodes
and the conversation's `context_key`. A later request that shares a longer
prefix with a snapshot than with any idle slot restores it instead of
prefilling again. The store is an LRU bounded by entry count and bytes.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, replace

from .._types import SippEmbeddingResponse

__all__ = ["EmbedMemo", "Snapshot", "SnapshotStore", "common_prefix"]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class Snapshot:
    tokens: tuple[int, ...]
    state: bytes
    context_key: str | None


class SnapshotStore:
    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[int, Snapshot] = OrderedDict()
        self._next_id = 0
        self.bytes = 0
        self.saved = 0
        self.restored = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, snap: Snapshot) -> bool:
        """Keep `snap` (dropping least recently used ones to make room); False if it can't fit."""
        size = len(snap.state)
        if size > self.max_bytes or self.max_entries == 0:
            return False
        # A newer snapshot of the same conversation supersedes the old one.
        if snap.context_key is not None:
            for key, old in list(self._items.items()):
                if old.context_key == snap.context_key:
                    self._drop(key)
        while self._items and (
            len(self._items) >= self.max_entries or self.bytes + size > self.max_bytes
        ):
            self._drop(next(iter(self._items)))
            self.evicted += 1
        self._items[self._next_id] = snap
        self._next_id += 1
        self.bytes += size
        self.saved += 1
        return True

    def best(self, tokens: list[int], context_key: str | None) -> tuple[int, int] | None:
        """(id, reusable prefix length) of the best snapshot for `tokens`, if any is useful."""
        best: tuple[int, int] | None = None
        for key, snap in self._items.items():
            shared = common_prefix(list(snap.tokens), tokens)
            pinned = context_key is not None and snap.context_key == context_key
            if shared and (best is None or shared > best[1] or (pinned and shared == best[1])):
                best = (key, shared)
        return best

    def take(self, key: int) -> Snapshot:
        """Remove and return a snapshot (its KV now lives in a slot again)."""
        snap = self._items.pop(key)
        self.bytes -= len(snap.state)
        self.restored += 1
        return snap

    def _drop(self, key: int) -> None:
        self.bytes -= len(self._items.pop(key).state)


_MemoKey = tuple[str, tuple[int, ...], bool]


class EmbedMemo:
    """Embedding results by (`context_key`, input tokens, normalize): an LRU bounded by
    entry count and by stored floats. Used from the preparation and worker threads."""

    def __init__(self, max_entries: int = 1024, max_values: int = 1 << 20) -> None:
        self.max_entries = max_entries
        self.max_values = max_values
        self._items: OrderedDict[_MemoKey, tuple[array[float], SippEmbeddingResponse]] = (
            OrderedDict()
        )
        self._values = 0
        self._lock = threading.Lock()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str, tokens: list[int], normalize: bool) -> SippEmbeddingResponse | None:
        with self._lock:
            found = self._items.get((key, tuple(tokens), normalize))
            if found is None:
                return None
            self._items.move_to_end((key, tuple(tokens), normalize))
            self.hits += 1
        values, response = found
        return replace(response, values=list(values))  # the caller owns its list

    def put(
        self, key: str, tokens: list[int], normalize: bool, response: SippEmbeddingResponse
    ) -> None:
        size = len(response.values)
        if size > self.max_values or self.max_entries == 0:
            return
        entry = (array("d", response.values), replace(response, values=[]))
        with self._lock:
            old = self._items.pop((key, tuple(tokens), normalize), None)
            if old is not None:
                self._values -= len(old[0])
            while self._items and (
                len(self._items) >= self.max_entries or self._values + size > self.max_values
            ):
                _, (dropped, _) = self._items.popitem(last=False)
                self._values -= len(dropped)
            self._items[(key, tuple(tokens), normalize)] = entry
            self._values += size
