"""The semantic half of a target's cache: on an exact miss, the stored question nearest in
meaning to this one, inside its partition.

A partition (`keys.partition_key`) is everything of a request but its last user message,
so only requests that differ in that message alone are ever compared. Each stored answer
adds one vector (the embedding of its last user message) under its exact key; a match
names that key, and the answer is read from the exact store like an exact hit. The
vectors live in memory, grouped by the embedding model's id (another model's vectors are
never compared), bounded like the store: an entry's vector expires with the entry's TTL
and the oldest vectors go past `max_entries`. A vector whose entry the store evicted
sooner (LRU) is dropped when a search finds it.

Each vector is stored durably with its entry, as a `SemanticRecord` in the entry's own
store write (SQLite: same transaction; Redis: same script), and dropped with it. At
startup a background task rebuilds the index from the store's records of this
embedding model (requests meanwhile miss semantically: served and stored as usual);
with a store other replicas write to (Redis), it then polls the store every
`FOLLOW_INTERVAL_S` for the records they added, off the request path.

Embedding goes through the gateway's own client and the endpoint serving the embedding
target, as a public embeddings request would: a disabled, failed or still loading
target, or a failed run, leaves the request uncached, and is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..._errors import ContextOverflowError, SippError
from ..background import stop_loop
from .config import SemanticConfig
from .entry import SemanticRecord
from .semantic import SemanticPartition
from .store import CacheStore, CacheStoreError, StoredRecord
from .vector_index import ANN_MIN_SIZE

if TYPE_CHECKING:
    from ..config import LocalTarget
    from ..metrics import GatewayMetrics
    from ..state import GatewayState

__all__ = [
    "Embedded",
    "Embedder",
    "EmbeddingFailed",
    "SemanticStage",
    "model_id",
    "target_embedder",
]

logger = logging.getLogger("sipp.gateway")
Vector = npt.NDArray[np.float32]
Embedder = Callable[[str], Awaitable[Vector]]
# One request's question vectors by (embedding target, text), None when too long to
# embed: the route stage and the cache stage embed a question once between them.
Embedded = dict[tuple[str, str], "Vector | None"]
FOLLOW_INTERVAL_S = 1.0  # how often a replica reads the records other replicas added
# Records read per step. A rebuild indexes its pages on a worker thread; records that
# other replicas add are indexed on the event loop (a few at a time, 500 at most: about
# 10 ms on the loaded 2-core machine).
_PAGE = 500
_REBUILD_PAGE = 2000
Ages = OrderedDict[str, tuple[str, float]]  # exact key -> (partition, added at), oldest first


class EmbeddingFailed(Exception):
    """The embedding target could not embed a question (counted and logged)."""


def model_id(target: LocalTarget) -> str:
    """What identifies the vector space of `target`: its GGUF (name and size, so a file
    replaced under the same name is another model) and its pooling."""
    try:
        size = os.stat(target.model).st_size
    except OSError:
        size = -1
    return f"{Path(target.model).name}:{size}:{target.runtime.context.pooling or 'default'}"


def target_embedder(state: GatewayState, name: str) -> Embedder:
    """Embed with the endpoint serving local target `name`, resolved per call (so an
    operator disabling it, or its engine stopping, is seen at once)."""
    from ..state import resolve_target

    async def embed(text: str) -> Vector:
        run = state.client.embed(text, endpoint=resolve_target(state, name))
        try:
            response = await run
        except asyncio.CancelledError:  # the caller went away: free the slot
            run.cancel("the request was cancelled")
            raise
        return np.asarray(response.values, dtype=np.float32)

    return embed


class SemanticStage:
    """One target's semantic index and the embedding calls that feed it."""

    def __init__(
        self,
        target: str,
        settings: SemanticConfig,
        model: str,
        embed: Embedder,
        metrics: GatewayMetrics,
        ttl_seconds: float,
        max_entries: int,
        clock: Callable[[], float] = time.time,
        graphs: Path | None = None,
        ann_min_size: int = ANN_MIN_SIZE,
    ) -> None:
        """`graphs`: a directory where ANN graphs are saved at shutdown and taken back at
        startup, so a clean restart need not build them again (the vectors themselves
        are in the store)."""
        self.target, self.settings, self.model = target, settings, model
        self._embed, self.metrics = embed, metrics
        self._ttl, self._max = ttl_seconds, max_entries
        self._clock, self._graphs, self._ann_min_size = clock, graphs, ann_min_size
        self._partitions: dict[str, SemanticPartition] = {}
        self._added: Ages = OrderedDict()
        self._reading: asyncio.Task[None] | None = None
        self.restored = asyncio.Event()  # set once the store's records are indexed

    def __len__(self) -> int:
        return len(self._added)

    async def embed(self, text: str) -> Vector | None:
        """`text`'s vector, or None when it is longer than the embedding target takes (that
        question is cached exactly only); `EmbeddingFailed` when the target failed."""
        started = time.perf_counter()
        try:
            return await self._embed(text)
        except ContextOverflowError:  # the question's fault, not the target's
            return None
        except SippError as exc:
            self.metrics.cache_embedding_failures.labels(self.target).inc()
            logger.warning(
                "cache of target %s: embedding with %s failed (%s); serving uncached",
                self.target,
                self.settings.embedding_target,
                exc.code,
            )
            raise EmbeddingFailed(exc.code) from None
        finally:
            self.metrics.cache_embedding.labels(self.target).observe(time.perf_counter() - started)

    def search(self, partition: str, text: str, vector: Vector) -> tuple[str | None, float | None]:
        """The exact key of the stored question nearest to `text` that clears the
        threshold and the guard, or None; and the nearest stored question's similarity,
        hit or not (a route's `near_miss`), or None when the partition is empty."""
        self._expire()
        part = self._partitions.get(partition)
        if part is None:
            return None, None
        try:
            found = part.search(
                text, vector, self.model, self.settings.threshold, guard=self.settings.guard
            )
        except SippError as exc:  # a vector the index refuses (e.g. no direction): a miss
            self._failed("semantic search", exc)
            return None, None
        if found.rejected:
            self.metrics.cache_guard_rejections.labels(self.target).inc(len(found.rejected))
        key = found.match.entry.payload_id if found.match is not None else None
        return key, found.nearest

    def add(self, partition: str, text: str, vector: Vector, key: str) -> None:
        self._expire()
        part = self._partitions.get(partition)
        if part is None:
            part = self._partitions[partition] = self._partition()
        self.remove(key)
        try:
            part.add(text, vector, key, self.model)
        except SippError as exc:
            self._failed("semantic store", exc)
            if not len(part):
                del self._partitions[partition]
            return
        self._added[key] = (partition, self._clock())
        while len(self._added) > self._max:
            self.remove(next(iter(self._added)))
        self._show()

    def remove(self, key: str) -> None:
        """Forget the vector of `key` (its entry expired or was evicted)."""
        found = self._added.pop(key, None)
        if found is None:
            return
        part = self._partitions[found[0]]
        part.remove(key)
        if not len(part):
            del self._partitions[found[0]]
        self._show()

    def clear(self) -> None:
        """Forget every vector: the store was purged, and its records went with the
        entries (a graph still building for a dropped partition is never adopted)."""
        self._partitions.clear()
        self._added.clear()
        self._show()

    def _show(self) -> None:
        self.metrics.cache_semantic_entries.labels(self.target).set(len(self._added))

    def _failed(self, operation: str, exc: Exception) -> None:
        self.metrics.cache_errors.labels(self.target, operation).inc()
        reason = exc.code if isinstance(exc, SippError) else f"{type(exc).__name__}: {exc}"
        logger.warning("cache %s for target %s failed (%s)", operation, self.target, reason)

    def _expire(self) -> None:
        # insertion order is expiry order: the TTL is absolute and the same for all
        horizon = self._clock() - self._ttl
        while self._added:
            key, (_, added) = next(iter(self._added.items()))
            if added > horizon:
                break
            self.remove(key)

    # -- durability: the records the store keeps with the entries -----------------------
    async def record(
        self, partition: str, text: str, vector: Vector | None
    ) -> SemanticRecord | None:
        """The record to store with a question's entry, embedding the question when the
        lookup did not (`Cache-Control: no-cache`); None when it has no vector (too long,
        or the embedding failed: counted, and the entry is cached exactly only)."""
        if vector is None:
            with contextlib.suppress(EmbeddingFailed):
                vector = await self.embed(text)
        return SemanticRecord(partition, text, self.model, vector) if vector is not None else None

    def start(self, store: CacheStore) -> None:
        """Rebuild the index from `store` in the background, then (a store shared with
        other replicas) keep reading what they add."""
        self._reading = asyncio.create_task(self._read(store), name=f"semantic-{self.target}")

    async def close(self) -> None:
        """Stop reading the store; save the ANN graphs built (see `graphs`)."""
        if self._reading is not None:
            await stop_loop(self._reading)
            self._reading = None
        if self._graphs is not None:
            try:
                await asyncio.to_thread(self._save_graphs, self._graphs)
            except (OSError, RuntimeError) as exc:  # the next start builds them instead
                self._failed("semantic graph save", exc)

    def _save_graphs(self, root: Path) -> None:
        keep = set()
        for name, part in list(self._partitions.items()):
            if part.has_graph():
                sub = root / _graph_dir(name)
                part.save_graphs(sub)
                keep.add(sub.name)
        if root.is_dir():
            for child in root.iterdir():
                if child.name not in keep:
                    shutil.rmtree(child, ignore_errors=True)

    async def _read(self, store: CacheStore) -> None:
        cursor: int | None = None  # None: not rebuilt yet
        warned = False
        started = time.perf_counter()
        while True:
            try:
                if cursor is None:
                    cursor = await self._rebuild(store)
                # then what was stored meanwhile (or, shared, by other replicas since)
                cursor = await self._read_since(store, cursor)
            except CacheStoreError as exc:  # retried: until then, fewer semantic hits
                if not warned:
                    self._failed("semantic read", exc)
                    warned = True
            except Exception:  # a bug: the exact cache and requests carry on without it
                logger.exception("cache of target %s: reading semantic records", self.target)
                self.metrics.cache_errors.labels(self.target, "semantic read").inc()
                return
            else:
                warned = False
                if not self.restored.is_set():
                    self._restored(time.perf_counter() - started)
                    if not store.shared:
                        return
            await asyncio.sleep(FOLLOW_INTERVAL_S)

    async def _rebuild(self, store: CacheStore) -> int:
        """Index every record of this model into fresh partitions on a worker thread (the
        event loop only awaits pages; nothing else sees these partitions yet), then put
        them in place of the live ones at once. Entries stored by requests meanwhile are
        in the store too: the caller reads them next. Returns the cursor reached."""
        parts: dict[str, SemanticPartition] = {}
        ages: list[tuple[str, str, float]] = []  # key, partition, added at
        cursor = 0
        while True:
            page = await store.records(self.model, cursor, _REBUILD_PAGE)
            if page.records:
                now = self._clock()
                await asyncio.to_thread(self._index, parts, ages, page.records, now)
            if page.cursor == cursor:
                break
            cursor = page.cursor
        horizon = self._clock() - self._ttl
        added = await asyncio.to_thread(self._finish, parts, ages, horizon)
        self._partitions, self._added = parts, added
        return cursor

    def _finish(
        self,
        parts: dict[str, SemanticPartition],
        ages: list[tuple[str, str, float]],
        horizon: float,
    ) -> Ages:
        added = _oldest_first(parts, ages, horizon, self._max)
        adopted = 0
        for name, part in parts.items():
            if self._graphs is not None:
                adopted += part.adopt_graphs(self._graphs / _graph_dir(name))
            part.release_builds()
        if adopted:
            logger.info("cache of target %s: %d saved ANN graphs reused", self.target, adopted)
        return added

    def _partition(self) -> SemanticPartition:
        return SemanticPartition(ann_min_size=self._ann_min_size)

    def _index(
        self,
        parts: dict[str, SemanticPartition],
        ages: list[tuple[str, str, float]],
        found: list[StoredRecord],
        now: float,
    ) -> None:
        groups: dict[str, list[StoredRecord]] = {}
        for item in found:
            if item.record.model == self.model:
                groups.setdefault(item.record.partition, []).append(item)
        for partition, items in groups.items():
            part = parts.get(partition)
            if part is None:
                part = parts[partition] = self._partition()
                part.hold_builds()  # until a saved graph is adopted or found missing
            if not self._add_records(part, items):
                continue
            ages += [(i.key, partition, now + i.ttl_left - self._ttl) for i in items]

    def _add_records(self, part: SemanticPartition, items: list[StoredRecord]) -> bool:
        """Index one partition's records read from the store; False (counted) when the
        index refuses their vectors, which are then skipped."""
        try:
            vectors = np.stack([i.record.vector for i in items])
            texts = [i.record.text for i in items]
            part.add_many(texts, vectors, [i.key for i in items], self.model)
        except (SippError, ValueError) as exc:
            self._failed("semantic restore", exc)
            return False
        return True

    async def _read_since(self, store: CacheStore, cursor: int) -> int:
        while True:
            page = await store.records(self.model, cursor, _PAGE)
            self._take(page.records)
            if page.cursor == cursor:
                return cursor
            cursor = page.cursor

    def _take(self, found: list[StoredRecord]) -> None:
        """Index records read from the store (those already indexed are skipped)."""
        now = self._clock()
        groups: dict[str, list[StoredRecord]] = {}
        for item in found:
            if item.record.model != self.model:
                continue
            if item.key in self._added:  # stored again (by another replica): a later expiry
                self._added[item.key] = (item.record.partition, now + item.ttl_left - self._ttl)
                self._added.move_to_end(item.key)
            else:
                groups.setdefault(item.record.partition, []).append(item)
        for partition, items in groups.items():
            part = self._partitions.get(partition)
            if part is None:
                part = self._partitions[partition] = self._partition()
            if not self._add_records(part, items):
                if not len(part):
                    del self._partitions[partition]
                continue
            for i in items:
                self._added[i.key] = (partition, now + i.ttl_left - self._ttl)
        self._bound()

    def _restored(self, seconds: float) -> None:
        self._bound()
        self.restored.set()
        logger.info(
            "cache of target %s: %d semantic entries restored in %.1f s",
            self.target,
            len(self._added),
            seconds,
        )

    def wait_built(self, timeout: float | None = None) -> bool:
        """Wait (a thread, not the event loop) until no partition's ANN graph is being
        built; False on timeout."""
        return all(part.wait_built(timeout) for part in list(self._partitions.values()))

    def _bound(self) -> None:
        self._expire()
        while len(self._added) > self._max:
            self.remove(next(iter(self._added)))
        self._show()


def _graph_dir(partition: str) -> str:
    return hashlib.sha256(partition.encode("utf-8")).hexdigest()[:32]


def _oldest_first(
    parts: dict[str, SemanticPartition],
    ages: list[tuple[str, str, float]],
    horizon: float,
    most: int,
) -> Ages:
    """The rebuilt entries by age, without those added at or before `horizon` (expired)
    or past the `most` newest, which are removed from `parts` (empty partitions too)."""
    ordered: Ages = OrderedDict()
    for key, partition, added in sorted(ages, key=lambda age: age[2]):
        ordered.pop(key, None)  # a key read twice (stored again meanwhile): the last one
        ordered[key] = (partition, added)
    while ordered:
        key, (partition, added) = next(iter(ordered.items()))
        if added > horizon and len(ordered) <= most:
            break
        del ordered[key]
        parts[partition].remove(key)
    for name in [name for name, part in parts.items() if not len(part)]:
        del parts[name]
    return ordered
