"""Nearest neighbours by cosine similarity over one partition's vectors.

`VectorIndex` keeps every vector in a float32 numpy matrix (the source of truth:
exact search, exact scores, persistence). Past `ann_min_size` entries, and when the
optional `usearch` package is installed (the `cache` extra), it also keeps an HNSW
graph and answers searches from it: a candidate list from the graph, each candidate
rescored exactly from the matrix. Below that size a matrix-vector product is both
exact and fast enough; bench/semantic_lookup.py measured where it stops being so.

Vectors are L2-normalised on the way in, so a dot product is the cosine similarity.
Not safe for concurrent use from several threads: the caller (one partition) locks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from ..._errors import InvalidConfigError, InvalidRequestError

__all__ = ["ANN_MIN_SIZE", "Neighbor", "VectorIndex", "ann_available"]

# Up to this many 384-dim vectors an exact search stays within about 1 ms (a tenth of
# the lookup budget) on this 2-core CPU: 0.12 ms at 1,000, 1.0 ms at 10,000, 2.3 ms at
# 20,000, 21 ms at 100,000, where the graph answers in 0.8 ms (bench/semantic_lookup.py,
# busy machine). Exact search needs no build time and no second copy of the vectors, so
# it is kept while it is that cheap.
ANN_MIN_SIZE = 10_000
_FORMAT = 1
_Vector = npt.NDArray[np.float32]


def ann_available() -> bool:
    """Whether the optional ANN library (`usearch`, the `cache` extra) is installed."""
    try:
        import usearch.index  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Neighbor:
    key: int
    similarity: float  # cosine, exact (rescored from the float32 matrix)


class _Ann:
    """An HNSW graph over half-precision copies of the vectors (usearch)."""

    # Connectivity 16 and expansion 128/64: recall@1 against exact search measured on
    # the benchmark's 100,000 MiniLM vectors; candidates are rescored exactly anyway.
    def __init__(self, dim: int) -> None:
        from usearch.index import Index

        self.index = Index(
            ndim=dim,
            metric="cos",
            dtype="f16",
            connectivity=16,
            expansion_add=128,
            expansion_search=64,
        )

    def add(self, keys: npt.NDArray[np.int64], vectors: _Vector, threads: int = 0) -> None:
        self.index.add(keys.astype(np.uint64), vectors, threads=threads)

    def remove(self, key: int) -> None:
        self.index.remove(key)

    def search(self, query: _Vector, k: int) -> npt.NDArray[np.uint64]:
        matches: Any = self.index.search(query, k, threads=1)
        return np.asarray(matches.keys, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self.index)


class VectorIndex:
    """Keys (int) -> unit vectors of one dimension; top-k by cosine similarity."""

    def __init__(self, dim: int, *, ann_min_size: int = ANN_MIN_SIZE, use_ann: bool = True) -> None:
        if dim < 1:
            raise InvalidRequestError("vector dimension must be at least 1")
        self.dim = dim
        self.ann_min_size = ann_min_size
        self.use_ann = use_ann and ann_available()
        self._vectors: _Vector = np.empty((16, dim), dtype=np.float32)
        self._keys: npt.NDArray[np.int64] = np.empty(16, dtype=np.int64)
        self._rows: dict[int, int] = {}  # key -> row
        self._ann: _Ann | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: int) -> bool:
        return key in self._rows

    @property
    def uses_ann(self) -> bool:
        """Whether searches go through the graph now."""
        return self._ann is not None

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
        else:
            self._maybe_build_ann()

    def remove(self, key: int) -> bool:
        """Drop `key`; False when it was not there. The last row moves into its place."""
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
        return True

    def search(self, query: npt.ArrayLike, k: int = 1, *, exact: bool = False) -> list[Neighbor]:
        """The `k` nearest keys, most similar first. `exact` skips the graph."""
        n = len(self._rows)
        if n == 0 or k < 1:
            return []
        q = self._unit_rows(query)[0]
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

    # -- persistence --------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the index into `directory` (created if needed). Each file is written
        beside its final name and renamed into place; meta.json goes last, so a save cut
        short leaves a count that `load` finds inconsistent rather than mixed data."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        n = len(self._rows)
        _atomic(path / "keys.npy", lambda f: np.save(f, self._keys[:n]))
        _atomic(path / "vectors.npy", lambda f: np.save(f, self._vectors[:n]))
        ann_file = path / "ann.usearch"
        if self._ann is not None:
            tmp = ann_file.with_name(ann_file.name + ".tmp")
            self._ann.index.save(str(tmp))
            tmp.replace(ann_file)
        elif ann_file.exists():
            ann_file.unlink()
        meta = {"format": _FORMAT, "dim": self.dim, "count": n, "ann": self._ann is not None}
        _atomic(path / "meta.json", lambda f: f.write(json.dumps(meta).encode()))

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        ann_min_size: int = ANN_MIN_SIZE,
        use_ann: bool = True,
    ) -> VectorIndex:
        """An index saved by `save`. A graph file is reused when it matches the vectors;
        otherwise (missing, stale, or usearch not installed) it is rebuilt or skipped."""
        path = Path(directory)
        try:
            meta = json.loads((path / "meta.json").read_text())
            keys = np.load(path / "keys.npy")
            vectors = np.load(path / "vectors.npy")
            dim, count = int(meta["dim"]), int(meta["count"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidConfigError(f"vector index at {path} is unreadable: {exc}") from None
        if meta.get("format") != _FORMAT or vectors.shape != (count, dim) or keys.shape != (count,):
            raise InvalidConfigError(f"vector index at {path} is inconsistent (cut short?)")
        index = cls(dim, ann_min_size=ann_min_size, use_ann=False)
        if count:
            index._reserve(count)
            index._vectors[:count] = vectors
            index._keys[:count] = keys
            index._rows = {int(k): i for i, k in enumerate(keys.tolist())}
        index.use_ann = use_ann and ann_available()
        ann_file = path / "ann.usearch"
        if index.use_ann and meta.get("ann") and ann_file.exists():
            ann = _Ann(dim)
            ann.index.load(str(ann_file))
            if len(ann) == count:
                index._ann = ann
        if index._ann is None:
            index._maybe_build_ann()
        return index

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
        if self.use_ann and self._ann is None and n >= self.ann_min_size:
            ann = _Ann(self.dim)
            ann.add(self._keys[:n], self._vectors[:n])
            self._ann = ann


def _dot(matrix: _Vector, q: _Vector) -> _Vector:
    # Not `matrix @ q`: that is OpenBLAS, whose worker threads spin between calls and
    # fight llama.cpp's threads for the cores (measured: a 3,000-row search took 24 ms
    # beside a busy embedder, 0.8 ms with one BLAS thread). einsum runs in this thread.
    out: _Vector = np.einsum("ij,j->i", matrix, q)
    return out


def _atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
