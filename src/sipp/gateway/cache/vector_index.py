"""Nearest neighbours by cosine similarity over one partition's vectors.

`VectorIndex` keeps every vector in a float32 numpy matrix (the source of truth:
exact search, exact scores; the vectors are kept durably by the cache's store). Past `ann_min_size` entries, and when the
optional `usearch` package is installed (the `cache` extra), it also keeps an HNSW
graph and answers searches from it: a candidate list from the graph, each candidate
rescored exactly from the matrix. Below that size a matrix-vector product is both
exact and fast enough; bench/semantic_lookup.py measured where it stops being so.

The graph is built off the request path: when the index reaches `ann_min_size`, a
background thread (one per process at a time, so two large partitions do not share
the cores three ways with inference) builds it from a snapshot of the vectors while
searches keep being answered exactly from the matrix. Additions and removals made
during the build are noted and replayed onto the graph before it is swapped in, so
none is lost (about 170 s of one core per 100,000 vectors; bench/semantic_restore.py).
A graph written by `save_graph` is taken back by a later process with `adopt_graph`.

Vectors are L2-normalised on the way in, so a dot product is the cosine similarity.
Thread-safe: one lock per index, never held while the graph builds.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import functools
import importlib.util
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..._errors import InvalidRequestError

__all__ = ["ANN_MIN_SIZE", "Neighbor", "VectorIndex", "ann_available", "in_background"]

logger = logging.getLogger("sipp.gateway")

# Up to this many 384-dim vectors an exact search stays within about 1 ms (a tenth of
# the lookup budget) on this 2-core CPU: 0.12 ms at 1,000, 1.0 ms at 10,000, 2.3 ms at
# 20,000, 21 ms at 100,000, where the graph answers in 0.8 ms (bench/semantic_lookup.py,
# busy machine). Exact search needs no build time and no second copy of the vectors, so
# it is kept while it is that cheap.
ANN_MIN_SIZE = 10_000
# Changes made during a build are replayed outside the lock until this few are left,
# which are replayed under it (a graph insert takes about a millisecond, and searches
# wait on the lock meanwhile).
_CATCH_UP = 16
_CHUNK = 4096  # changes replayed per round outside the lock
_BATCH = 1024  # vectors inserted into a graph between two looks at `_STOP`
_Vector = npt.NDArray[np.float32]
_BUILDS = threading.Lock()  # one graph build at a time in the process
_STOP = threading.Event()  # set at interpreter exit: builds stop at their next batch
_running: set[threading.Thread] = set()
Job = Callable[[], None]


class _Stopped(Exception):
    """The process is exiting: the build was abandoned."""


def in_background(job: Job) -> None:
    """Run a graph build on a daemon thread (it must not keep the process alive), one
    build at a time."""

    def run() -> None:
        try:
            with _BUILDS:
                if not _STOP.is_set():
                    job()
        finally:
            _running.discard(thread)

    thread = threading.Thread(target=run, name="sipp-ann-build", daemon=True)
    _running.add(thread)
    thread.start()


@atexit.register
def _stop_builds() -> None:
    # A daemon thread still inside usearch when the interpreter goes down aborts the
    # process (its C++ threads are torn down joinable): stop builds between batches and
    # wait for them, which takes one batch (about a second).
    _STOP.set()
    for thread in list(_running):
        thread.join(timeout=60)


def ann_available() -> bool:
    """Whether the optional ANN library (`usearch`, the `cache` extra) is installed."""
    try:
        _usearch_index()
    except ImportError:
        return False
    return True


@functools.cache
def _usearch_index() -> Any:
    """`usearch.index`, imported once the shared C++ runtime has its classic locale.

    usearch's extension carries a C++ runtime of its own. Imported while the shared one
    (which llama.cpp uses) has not yet set up its classic locale, it leaves that one
    with locale facets it cannot cast: every later llama.cpp model load in the process
    fails in its tokenizer's regular expressions ("error loading model vocabulary:
    std::bad_cast"). Asking the shared runtime for `std::locale::classic()` first sets
    it up on its own terms."""
    if importlib.util.find_spec("usearch") is None:  # before looking for the runtime
        raise ImportError("usearch is not installed (the `cache` extra)")
    _init_shared_cxx_locale()
    import usearch.index

    return usearch.index


def _init_shared_cxx_locale() -> None:
    name = ctypes.util.find_library("stdc++")
    if name is None:  # no GNU C++ runtime here (libc++ platforms): nothing to set up
        return
    try:
        classic = ctypes.CDLL(name)._ZNSt6locale7classicEv  # std::locale::classic()
    except (OSError, AttributeError):
        return
    classic.restype = ctypes.c_void_p
    classic()


@dataclass(frozen=True)
class Neighbor:
    key: int
    similarity: float  # cosine, exact (rescored from the float32 matrix)


class _Ann:
    """An HNSW graph over half-precision copies of the vectors (usearch)."""

    # Connectivity 16 and expansion 128/64: recall@1 against exact search measured on
    # the benchmark's 100,000 MiniLM vectors; candidates are rescored exactly anyway.
    def __init__(self, dim: int) -> None:
        self.index = _usearch_index().Index(
            ndim=dim,
            metric="cos",
            dtype="f16",
            connectivity=16,
            expansion_add=128,
            expansion_search=64,
        )

    def add(self, keys: npt.NDArray[np.int64], vectors: _Vector, threads: int = 0) -> None:
        """Insert in batches, stopping between two when the process is exiting."""
        for start in range(0, len(keys), _BATCH):
            if _STOP.is_set():
                raise _Stopped
            batch = keys[start : start + _BATCH].astype(np.uint64)
            self.index.add(batch, vectors[start : start + _BATCH], threads=threads)

    def remove(self, key: int) -> None:
        self.index.remove(key)

    def replay(
        self, changed: npt.NDArray[np.int64], present: npt.NDArray[np.int64], rows: _Vector
    ) -> None:
        """Bring the graph up to date for `changed` keys: drop what it held for them, then
        insert those still `present` (their vectors are `rows`, in the same order)."""
        for key in changed.tolist():
            if self.index.contains(key):
                self.index.remove(key)
        if len(present):
            self.add(present, rows, threads=1)

    def search(self, query: _Vector, k: int) -> npt.NDArray[np.uint64]:
        matches: Any = self.index.search(query, k, threads=1)
        return np.asarray(matches.keys, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self.index)


class VectorIndex:
    """Keys (int) -> unit vectors of one dimension; top-k by cosine similarity."""

    def __init__(
        self,
        dim: int,
        *,
        ann_min_size: int = ANN_MIN_SIZE,
        use_ann: bool = True,
        start_build: Callable[[Job], None] = in_background,
        build_threads: int = 1,
    ) -> None:
        """`start_build` runs a graph build (a job to call once); `build_threads` is how
        many threads the build uses (one leaves the other cores to inference)."""
        if dim < 1:
            raise InvalidRequestError("vector dimension must be at least 1")
        self.dim = dim
        self.ann_min_size = ann_min_size
        self.use_ann = use_ann and ann_available()
        self._start_build, self._build_threads = start_build, build_threads
        self._vectors: _Vector = np.empty((16, dim), dtype=np.float32)
        self._keys: npt.NDArray[np.int64] = np.empty(16, dtype=np.int64)
        self._rows: dict[int, int] = {}  # key -> row
        self._ann: _Ann | None = None
        self._touched: set[int] | None = None  # while a graph builds: keys changed since
        self._built = threading.Event()  # set once no build is under way
        self._built.set()
        self._held = False  # `hold_builds`: no build starts until `release_builds`
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: int) -> bool:
        return key in self._rows

    @property
    def uses_ann(self) -> bool:
        """Whether searches go through the graph now."""
        return self._ann is not None

    @property
    def building(self) -> bool:
        """Whether a graph is being built (searches are exact meanwhile)."""
        return not self._built.is_set()

    def wait_built(self, timeout: float | None = None) -> bool:
        """Wait until no graph build is under way; False on timeout."""
        return self._built.wait(timeout)

    def nbytes(self) -> int:
        """Bytes the float32 matrix holds (the graph's own memory is not counted)."""
        return int(self._vectors.nbytes + self._keys.nbytes)

    def add(self, key: int, vector: npt.ArrayLike) -> None:
        """Insert `key` (replacing an existing entry of that key)."""
        self.add_many(
            np.array([key], dtype=np.int64), np.asarray(vector, dtype=np.float32)[None, :]
        )

    def add_many(self, keys: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        keys_arr = np.asarray(keys, dtype=np.int64).reshape(-1)
        matrix = self._unit_rows(vectors)
        if len(keys_arr) != len(matrix):
            raise InvalidRequestError(f"{len(keys_arr)} keys for {len(matrix)} vectors")
        if len(set(keys_arr.tolist())) != len(keys_arr) or np.any(keys_arr < 0):
            raise InvalidRequestError("keys must be distinct and non-negative")
        with self._lock:
            self._add_locked(keys_arr, matrix)

    def _add_locked(self, keys_arr: npt.NDArray[np.int64], matrix: _Vector) -> None:
        for key in keys_arr.tolist():
            if key in self._rows:
                self.remove(key)
        start = len(self._rows)
        self._reserve(start + len(keys_arr))
        self._vectors[start : start + len(keys_arr)] = matrix
        self._keys[start : start + len(keys_arr)] = keys_arr
        for offset, key in enumerate(keys_arr.tolist()):
            self._rows[key] = start + offset
        if self._ann is not None:
            self._ann.add(keys_arr, matrix)
        elif self._touched is not None:
            self._touched.update(keys_arr.tolist())
        else:
            self._maybe_build_ann()

    def remove(self, key: int) -> bool:
        """Drop `key`; False when it was not there. The last row moves into its place."""
        with self._lock:
            return self._remove_locked(key)

    def _remove_locked(self, key: int) -> bool:
        row = self._rows.pop(key, None)
        if row is None:
            return False
        last = len(self._rows)
        if row != last:
            moved = int(self._keys[last])
            self._vectors[row] = self._vectors[last]
            self._keys[row] = moved
            self._rows[moved] = row
        if self._ann is not None:
            self._ann.remove(key)
        elif self._touched is not None:
            self._touched.add(key)
        return True

    def search(self, query: npt.ArrayLike, k: int = 1, *, exact: bool = False) -> list[Neighbor]:
        """The `k` nearest keys, most similar first. `exact` skips the graph."""
        q = self._unit_rows(query)[0]
        with self._lock:
            return self._search_locked(q, k, exact)

    def _search_locked(self, q: _Vector, k: int, exact: bool) -> list[Neighbor]:
        n = len(self._rows)
        if n == 0 or k < 1:
            return []
        if self._ann is not None and not exact:
            # A few more candidates than asked: the graph ranks half-precision copies.
            found = self._ann.search(q, max(k, 4) * 2)
            rows = np.array(
                [self._rows[int(key)] for key in found.tolist() if int(key) in self._rows]
            )
            if len(rows) == 0:
                return []
            scores = _dot(self._vectors[rows], q)
        else:
            rows = np.arange(n)
            scores = _dot(self._vectors[:n], q)
        take = min(k, len(rows))
        best = (
            np.argpartition(-scores, take - 1)[:take] if take < len(rows) else np.arange(len(rows))
        )
        best = best[np.argsort(-scores[best], kind="stable")]
        return [Neighbor(int(self._keys[rows[i]]), float(scores[i])) for i in best]

    # -- a graph kept across restarts ---------------------------------------------------
    def hold_builds(self) -> None:
        """Start no graph build until `release_builds` (a bulk load that may adopt one)."""
        with self._lock:
            self._held = True

    def release_builds(self) -> None:
        with self._lock:
            self._held = False
            self._maybe_build_ann()

    def save_graph(self, path: Path) -> list[int] | None:
        """Write the graph (when one is in use) to `path`; the keys it holds, or None."""
        with self._lock:
            if self._ann is None:
                return None
            tmp = path.with_name(path.name + ".tmp")
            self._ann.index.save(str(tmp))
            tmp.replace(path)
            return [int(k) for k in self._keys[: len(self._rows)].tolist()]

    def adopt_graph(self, path: Path, renamed: dict[int, int]) -> bool:
        """Use the graph saved at `path` instead of building one: its keys are renamed
        by `renamed` (old -> key now), those not there are removed, and the vectors it
        lacks are inserted. Meant for an index nothing searches yet (a bulk load): the
        work runs under the lock. False (and nothing changed) when the file is unusable."""
        with self._lock:
            if not self.use_ann or self._ann is not None or self._touched is not None:
                return False
            if not path.is_file():
                return False
            ann = _Ann(self.dim)
            try:
                ann.index.load(str(path))
                old = np.asarray(ann.index.keys, dtype=np.int64)
            except (OSError, RuntimeError, ValueError) as exc:
                logger.warning("saved ANN graph %s unusable (%s); rebuilding it", path, exc)
                return False
            if ann.index.ndim != self.dim:
                return False
            kept = [k for k in old.tolist() if renamed.get(k) in self._rows]
            for key in set(old.tolist()) - set(kept):
                ann.index.remove(key)
            # through keys no entry uses (above every key), so no rename lands on a key
            # still waiting for its own rename
            parked = np.arange(len(kept), dtype=np.uint64) + np.uint64(1 << 62)
            ann.index.rename(np.asarray(kept, dtype=np.uint64), parked)
            ann.index.rename(parked, np.asarray([renamed[k] for k in kept], dtype=np.uint64))
            have = {renamed[k] for k in kept}
            missing = [k for k in self._rows if k not in have]
            if len(missing) <= _CATCH_UP:
                rows = self._vectors[[self._rows[k] for k in missing]]
                ann.add(np.array(missing, dtype=np.int64), rows, 1)
                self._ann = ann
            else:  # many stored since (a crash): inserted in the background, exact meanwhile
                self._touched = set(missing)
                self._built.clear()
                none = np.empty(0, dtype=np.int64)
                self._start_build(lambda: self._build(none, self._vectors[:0], ann))
            return True

    # -- internals ----------------------------------------------------------------------
    def _unit_rows(self, vectors: npt.ArrayLike) -> _Vector:
        matrix = np.asarray(vectors, dtype=np.float32)
        if matrix.ndim == 1:
            matrix = matrix[None, :]
        if matrix.ndim != 2 or matrix.shape[1] != self.dim:
            raise InvalidRequestError(
                f"expected vectors of dimension {self.dim}, got shape {tuple(matrix.shape)}"
            )
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise InvalidRequestError("vectors must be finite and non-zero")
        out: _Vector = (matrix / norms).astype(np.float32, copy=False)
        return out

    def _reserve(self, size: int) -> None:
        capacity = len(self._keys)
        if size <= capacity:
            return
        while capacity < size:
            capacity *= 2
        vectors = np.empty((capacity, self.dim), dtype=np.float32)
        keys = np.empty(capacity, dtype=np.int64)
        n = len(self._rows)
        vectors[:n], keys[:n] = self._vectors[:n], self._keys[:n]
        self._vectors, self._keys = vectors, keys

    def _maybe_build_ann(self) -> None:
        n = len(self._rows)
        if self._held or self._ann is not None or self._touched is not None:
            return
        if self.use_ann and n >= self.ann_min_size:
            keys, vectors = self._keys[:n].copy(), self._vectors[:n].copy()
            self._touched = set()
            self._built.clear()
            self._start_build(lambda: self._build(keys, vectors))

    def _build(
        self, keys: npt.NDArray[np.int64], vectors: _Vector, ann: _Ann | None = None
    ) -> None:
        """Build the graph from a snapshot without the lock (or take `ann`, a graph that
        lacks only the keys touched), replay the changes made meanwhile, and swap it in;
        on failure searches stay exact (logged, not retried)."""
        try:
            if ann is None:
                ann = _Ann(self.dim)
                ann.add(keys, vectors, threads=self._build_threads)
            while True:
                with self._lock:
                    touched = self._touched
                    assert touched is not None
                    last = len(touched) <= _CATCH_UP
                    # a chunk at a time: a copy of every row added meanwhile could be large
                    taken = [touched.pop() for _ in range(min(len(touched), _CHUNK))]
                    changed = np.array(taken, dtype=np.int64)
                    present = np.array([k for k in taken if k in self._rows], dtype=np.int64)
                    rows = self._vectors[[self._rows[k] for k in present.tolist()]]
                    if last:
                        ann.replay(changed, present, rows)
                        self._ann, self._touched = ann, None
                        return
                # rows is a copy; a key touched again meanwhile is back in the set
                ann.replay(changed, present, rows)
        except _Stopped:
            pass
        except Exception:
            logger.exception("building the ANN graph failed; searches stay exact")
            with self._lock:
                self.use_ann, self._touched = False, None
        finally:
            self._built.set()


def _dot(matrix: _Vector, q: _Vector) -> _Vector:
    # Not `matrix @ q`: that is OpenBLAS, whose worker threads spin between calls and
    # fight llama.cpp's threads for the cores (measured: a 3,000-row search took 24 ms
    # beside a busy embedder, 0.8 ms with one BLAS thread). einsum runs in this thread.
    out: _Vector = np.einsum("ij,j->i", matrix, q)
    return out
