"""Semantic lookup inside one cache partition.

A partition is everything of a request except its last user message (scope, target,
system prompt, earlier turns, parameters), hashed by the cache's key module; inside it,
`SemanticPartition` compares last user messages by cosine similarity of their
embeddings. An entry is (vector, text, payload id, embedding model id): the payload
id names the stored response in the cache's store; the text is what the guard
compares; the model id keeps vectors of different embedding models apart.

Vectors of different models are never compared: each model id has its own index,
and a search with a model that has no entries finds nothing. Changing a target's
embedding model therefore starts that partition's semantic cache from empty.

Thread-safe: one lock per partition (searches take well under a millisecond, or about
20 ms at 100,000 entries while their graph is still being built).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..._errors import InvalidRequestError
from .guard import GuardVerdict, guard_rejects, signals
from .vector_index import ANN_MIN_SIZE, Job, VectorIndex, in_background

__all__ = ["SearchOutcome", "SemanticEntry", "SemanticMatch", "SemanticPartition"]

_CANDIDATES = 4  # neighbours tried in order when the guard rejects the nearest


@dataclass(frozen=True)
class SemanticEntry:
    text: str
    payload_id: str
    model_id: str


@dataclass(frozen=True)
class SemanticMatch:
    entry: SemanticEntry
    similarity: float


@dataclass(frozen=True)
class SearchOutcome:
    """A search's result and, for metrics and logs, what the guard turned away."""

    match: SemanticMatch | None
    rejected: tuple[tuple[SemanticMatch, GuardVerdict], ...] = ()
    nearest: float | None = None  # the nearest entry's similarity, whatever the threshold


@dataclass
class _Model:
    index: VectorIndex
    entries: dict[int, SemanticEntry]  # the guard reads texts only for the few candidates


class SemanticPartition:
    """The semantic entries of one partition, grouped by embedding model id."""

    def __init__(
        self,
        *,
        ann_min_size: int = ANN_MIN_SIZE,
        use_ann: bool = True,
        start_build: Callable[[Job], None] = in_background,
    ) -> None:
        """`start_build` runs each model's graph build (see `VectorIndex`)."""
        self._ann_min_size = ann_min_size
        self._use_ann = use_ann
        self._start_build = start_build
        self._held = False  # hold_builds: new models' indexes hold theirs too
        self._models: dict[str, _Model] = {}
        self._by_payload: dict[str, tuple[str, int]] = {}  # payload id -> (model id, key)
        self._next_key = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_payload)

    def models(self) -> list[str]:
        with self._lock:
            return [m for m, group in self._models.items() if group.entries]

    def add(self, text: str, vector: npt.ArrayLike, payload_id: str, model_id: str) -> None:
        """Store an entry; an entry with the same payload id is replaced."""
        if not model_id or not payload_id:
            raise InvalidRequestError("payload id and embedding model id must be non-empty")
        entry = SemanticEntry(text, payload_id, model_id)
        with self._lock:
            self._remove_locked(payload_id)
            group = self._group_locked(model_id, int(np.asarray(vector, np.float32).size))
            key = self._next_key
            group.index.add(key, vector)  # raises on a dimension the model never had
            self._next_key += 1
            group.entries[key] = entry
            self._by_payload[payload_id] = (model_id, key)

    def add_many(
        self,
        texts: Sequence[str],
        vectors: npt.ArrayLike,
        payload_ids: Sequence[str],
        model_id: str,
    ) -> None:
        """`add` for many entries of one model at once (one graph insert: a warm start
        or a bulk load); entries with these payload ids are replaced."""
        matrix = np.asarray(vectors, dtype=np.float32)
        if not (len(texts) == len(payload_ids) == len(matrix)) or matrix.ndim != 2:
            raise InvalidRequestError("one text, one vector and one payload id per entry")
        if not model_id or not all(payload_ids) or len(set(payload_ids)) != len(payload_ids):
            raise InvalidRequestError("payload ids must be distinct and non-empty")
        with self._lock:
            for payload_id in payload_ids:
                self._remove_locked(payload_id)
            group = self._group_locked(model_id, matrix.shape[1])
            keys = np.arange(self._next_key, self._next_key + len(texts), dtype=np.int64)
            group.index.add_many(keys, matrix)
            self._next_key += len(texts)
            for key, text, payload_id in zip(keys.tolist(), texts, payload_ids):
                group.entries[key] = SemanticEntry(text, payload_id, model_id)
                self._by_payload[payload_id] = (model_id, key)

    def remove(self, payload_id: str) -> bool:
        """Drop the entry of `payload_id` (expired or evicted); False when absent."""
        with self._lock:
            return self._remove_locked(payload_id)

    def search(
        self,
        text: str,
        vector: npt.ArrayLike,
        model_id: str,
        threshold: float,
        *,
        guard: bool = True,
        exact: bool = False,
    ) -> SearchOutcome:
        """The most similar entry of `model_id` at or above `threshold` that the guard
        lets through (nearest first, a few candidates deep), or no match."""
        with self._lock:
            group = self._models.get(model_id)
            if group is None or not group.entries:
                return SearchOutcome(None)
            neighbors = group.index.search(vector, _CANDIDATES, exact=exact)
            nearest = neighbors[0].similarity if neighbors else None
            query = signals(text) if guard else None
            rejected: list[tuple[SemanticMatch, GuardVerdict]] = []
            for neighbor in neighbors:
                if neighbor.similarity < threshold:
                    break
                match = SemanticMatch(group.entries[neighbor.key], neighbor.similarity)
                verdict = guard_rejects(query, match.entry.text) if query is not None else None
                if verdict is None:
                    return SearchOutcome(match, tuple(rejected), nearest)
                rejected.append((match, verdict))
            return SearchOutcome(None, tuple(rejected), nearest)

    # -- ANN graphs kept across restarts (the vectors themselves live in the store) -------
    def hold_builds(self) -> None:
        """Start no graph build during a bulk load (see `adopt_graphs`); new models too."""
        with self._lock:
            self._held = True
            for group in self._models.values():
                group.index.hold_builds()

    def release_builds(self) -> None:
        with self._lock:
            self._held = False
            for group in self._models.values():
                group.index.release_builds()

    def has_graph(self) -> bool:
        with self._lock:
            return any(group.index.uses_ann for group in self._models.values())

    def save_graphs(self, directory: Path) -> None:
        """Write each model's ANN graph (when one is in use) with the payload id of each of
        its keys, under `directory`; graphs of models no longer held are removed."""
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            keep = set()
            for model_id, group in self._models.items():
                name = _graph_name(model_id)
                keys = group.index.save_graph(directory / f"{name}.usearch")
                if keys is None:
                    continue
                payloads = {str(k): group.entries[k].payload_id for k in keys}
                tmp = directory / f"{name}.json.tmp"
                tmp.write_text(json.dumps(payloads), encoding="utf-8")
                tmp.replace(directory / f"{name}.json")
                keep |= {f"{name}.usearch", f"{name}.json"}
        for child in directory.iterdir():
            if child.name not in keep:
                child.unlink()

    def adopt_graphs(self, directory: Path) -> int:
        """After a bulk load: take each model's graph saved by `save_graphs` instead of
        building it (renamed to this partition's keys; entries gone since are dropped
        from it, new ones inserted). Unreadable files are skipped. How many were taken."""
        taken = 0
        with self._lock:
            for model_id, group in self._models.items():
                name = _graph_name(model_id)
                try:
                    raw = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
                    saved = {int(k): str(v) for k, v in raw.items()}
                except (OSError, ValueError, TypeError, AttributeError):
                    continue
                renamed = {}
                for old, payload in saved.items():
                    found = self._by_payload.get(payload)
                    if found is not None and found[0] == model_id:
                        renamed[old] = found[1]
                taken += group.index.adopt_graph(directory / f"{name}.usearch", renamed)
        return taken

    def wait_built(self, timeout: float | None = None) -> bool:
        """Wait until no ANN graph of this partition is being built; False on timeout."""
        with self._lock:
            indexes = [group.index for group in self._models.values()]
        return all(index.wait_built(timeout) for index in indexes)

    # -- internals ----------------------------------------------------------------------
    def _group_locked(self, model_id: str, dim: int) -> _Model:
        group = self._models.get(model_id)
        if group is None:
            index = VectorIndex(
                dim,
                ann_min_size=self._ann_min_size,
                use_ann=self._use_ann,
                start_build=self._start_build,
            )
            if self._held:
                index.hold_builds()
            group = self._models[model_id] = _Model(index, {})
        return group

    def _remove_locked(self, payload_id: str) -> bool:
        found = self._by_payload.pop(payload_id, None)
        if found is None:
            return False
        model_id, key = found
        group = self._models[model_id]
        group.index.remove(key)
        del group.entries[key]
        return True


def _graph_name(model_id: str) -> str:
    return "model-" + hashlib.sha256(model_id.encode("utf-8")).hexdigest()[:16]
