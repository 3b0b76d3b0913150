"""The semantic half of a target's cache: on an exact miss, the stored question nearest in
meaning to this one, inside its partition.

A partition (`keys.partition_key`) is everything of a request but its last user message,
so only requests that differ in that message alone are ever compared. Each stored answer
adds one vector (the embedding of its last user message) under its exact key; a match
names that key, and the answer is read from the exact store like an exact hit. The
vectors live in memory, grouped by the embedding model's id (another model's vectors are
never compared), bounded like the store: an entry's vector expires with the entry's TTL
and the oldest vectors go past `max_entries`. A vector whose entry the store evicted
sooner (LRU) is dropped when a search finds it. With the SQLite backend they are saved at
shutdown beside the store file and loaded at startup, so a restart keeps semantic hits;
with Redis they are per replica (see README).

Embedding goes through the gateway's own client and the endpoint serving the embedding
target, as a public embeddings request would: a disabled, failed or still loading
target, or a failed run, leaves the request uncached, and is counted.
"""

from __future__ import annotations

import asyncio
import json
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
from .config import SemanticConfig
from .semantic import SemanticPartition

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
_INDEX = "vectors.json"  # exact key -> [partition, added at], in insertion order


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
        directory: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.target, self.settings, self.model = target, settings, model
        self._embed, self.metrics = embed, metrics
        self._ttl, self._max = ttl_seconds, max_entries
        self.directory, self._clock = directory, clock
        self._partitions: dict[str, SemanticPartition] = {}
        self._added: OrderedDict[str, tuple[str, float]] = OrderedDict()

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
            part = self._partitions[partition] = SemanticPartition()
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
        """Forget every vector (the store was purged), on disk too."""
        self._partitions.clear()
        self._added.clear()
        self._show()
        if self.directory is not None and self.directory.is_dir():
            try:
                self.save()
            except OSError as exc:  # the next save at shutdown tries again
                logger.warning(
                    "cache of target %s: semantic index not saved (%s)", self.target, exc
                )

    def _show(self) -> None:
        self.metrics.cache_semantic_entries.labels(self.target).set(len(self._added))

    def _failed(self, operation: str, exc: SippError) -> None:
        self.metrics.cache_errors.labels(self.target, operation).inc()
        logger.warning("cache %s for target %s failed (%s)", operation, self.target, exc.code)

    def _expire(self) -> None:
        # insertion order is expiry order: the TTL is absolute and the same for all
        horizon = self._clock() - self._ttl
        while self._added:
            key, (_, added) = next(iter(self._added.items()))
            if added > horizon:
                break
            self.remove(key)

    # -- persistence (SQLite backend) ---------------------------------------------------
    def save(self) -> None:
        """Write every partition under `directory`; partitions no longer held are removed."""
        if self.directory is None:
            return
        self._expire()
        root = self.directory
        root.mkdir(parents=True, exist_ok=True)
        for name, part in self._partitions.items():
            part.save(root / name)
        for child in root.iterdir():
            if child.is_dir() and child.name not in self._partitions:
                shutil.rmtree(child)
        tmp = root / (_INDEX + ".tmp")
        tmp.write_text(json.dumps([[k, p, t] for k, (p, t) in self._added.items()]))
        tmp.replace(root / _INDEX)

    def load(self) -> None:
        """Read what `save` wrote; unreadable files leave the semantic index empty (the
        exact entries still answer) rather than failing startup."""
        if self.directory is None or not (self.directory / _INDEX).is_file():
            return
        try:
            rows = json.loads((self.directory / _INDEX).read_text())
            added = OrderedDict((str(k), (str(p), float(t))) for k, p, t in rows)
            parts = {p: SemanticPartition.load(self.directory / p) for p, _ in added.values()}
        except (OSError, ValueError, TypeError, SippError) as exc:
            logger.warning(
                "cache of target %s: saved semantic index unreadable (%s); starting empty",
                self.target,
                exc,
            )
            return
        self._partitions, self._added = parts, added
        self._expire()
        self._show()
