"""The ANN graph is built off the request path: while it builds (held here by an event,
not by timing), searches are answered exactly and additions, replacements and removals
made meanwhile are all in the graph once it is swapped in."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from sipp.gateway.cache.semantic import SemanticPartition
from sipp.gateway.cache.vector_index import VectorIndex, ann_available

DIM = 64
MODEL = "model-a"


def _vectors(n: int, seed: int = 7) -> npt.NDArray[np.float32]:
    # random directions in 64 dimensions are nearly orthogonal: each is its own nearest
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


class HeldBuilds:
    """A `start_build` that runs each build on a thread once `release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = 0

    def __call__(self, job: Callable[[], None]) -> None:
        self.started += 1

        def run() -> None:
            assert self.release.wait(120), "the test never released the build"
            job()

        threading.Thread(target=run, daemon=True).start()


@pytest.fixture(autouse=True)
def _usearch() -> None:
    assert ann_available(), "the cache extra (usearch) is part of the dev install"


def test_searches_during_a_build_are_exact_and_changes_made_meanwhile_are_kept() -> None:
    vectors = _vectors(600)
    builds = HeldBuilds()
    index = VectorIndex(DIM, ann_min_size=200, start_build=builds)
    index.add_many(np.arange(250), vectors[:250])  # past the size: a build starts, held
    assert builds.started == 1 and index.building and not index.uses_ann
    for i in (0, 17, 249):
        assert index.search(vectors[i], k=1)[0].key == i
    # more changes during the build than are replayed under the lock at the end
    index.add_many(np.arange(250, 400), vectors[250:400])
    index.add(1000, vectors[500])
    index.add(7, vectors[501])  # a key of the snapshot, replaced
    assert index.remove(5) and index.remove(300)  # one of the snapshot, one added since
    assert index.search(vectors[500], k=1)[0].key == 1000
    assert index.search(vectors[501], k=1)[0].key == 7
    assert builds.started == 1  # one build at a time
    builds.release.set()
    assert index.wait_built(120) and index.uses_ann and not index.building
    assert len(index) == 399
    for key, row in [(1000, 500), (7, 501), (0, 0), (249, 249), (250, 250), (399, 399)]:
        assert index.search(vectors[row], k=1)[0].key == key  # through the graph now
    assert index.search(vectors[7], k=1)[0].key != 7  # the replaced vector is gone
    for removed in (5, 300):
        assert all(n.key != removed for n in index.search(vectors[removed], k=10))
    # the graph agrees with an exact search for every key added during the build
    for key in range(250, 400):
        if key != 300:
            assert index.search(vectors[key], k=1) == index.search(vectors[key], k=1, exact=True)


def test_a_partition_answers_from_the_vectors_while_its_graph_builds() -> None:
    vectors = _vectors(300, seed=3)
    builds = HeldBuilds()
    part = SemanticPartition(ann_min_size=100, start_build=builds)
    texts = [f"question {i}" for i in range(300)]
    part.add_many(texts[:50], vectors[:50], [f"p{i}" for i in range(50)], MODEL)
    assert builds.started == 0
    part.add_many(texts[50:150], vectors[50:150], [f"p{i}" for i in range(50, 150)], MODEL)
    assert builds.started == 1 and not part.wait_built(timeout=0)
    hit = part.search(texts[120], vectors[120], MODEL, threshold=0.99, guard=False).match
    assert hit is not None and hit.entry.payload_id == "p120"
    part.add(texts[200], vectors[200], "late", MODEL)
    builds.release.set()
    assert part.wait_built(120)
    late = part.search(texts[200], vectors[200], MODEL, threshold=0.99, guard=False).match
    assert late is not None and late.entry.payload_id == "late"


EXITING = """
import numpy as np
from sipp.gateway.cache.vector_index import VectorIndex

index = VectorIndex(64, ann_min_size=100)
index.add_many(np.arange(50_000), np.random.default_rng(1).standard_normal((50_000, 64)))
print("building" if index.building else "built")
"""


def test_a_process_exiting_during_a_build_exits_cleanly() -> None:
    """A build still inside usearch when the interpreter goes down used to abort the
    process (SIGABRT): a gateway stopped during a build must exit with 0."""
    done = subprocess.run(
        [sys.executable, "-c", EXITING], capture_output=True, text=True, timeout=300
    )
    assert done.stdout.strip() == "building"  # 50,000 vectors take far longer to insert
    assert done.returncode == 0, done.stderr


def test_a_saved_graph_is_adopted_under_new_keys(tmp_path: Path) -> None:
    vectors = _vectors(400, seed=11)
    first = VectorIndex(DIM, ann_min_size=100, start_build=lambda job: job())
    first.add_many(np.arange(300), vectors[:300])
    saved = first.save_graph(tmp_path / "graph.usearch")
    assert first.uses_ann and saved is not None and sorted(saved) == list(range(300))
    # keys shifted by one: each rename lands on a key another one still holds
    renamed = {k: k + 1 for k in range(300)}
    builds = HeldBuilds()
    few = VectorIndex(DIM, ann_min_size=100, start_build=builds)
    few.hold_builds()
    few.add_many(np.arange(1, 296), vectors[:295])  # 5 entries gone since the save
    few.add_many(np.arange(1000, 1010), vectors[300:310])  # 10 stored since
    assert few.adopt_graph(tmp_path / "graph.usearch", renamed)
    few.release_builds()
    assert few.uses_ann and builds.started == 0  # no build: the graph is in use at once
    for row, key in [(0, 1), (150, 151), (294, 295), (300, 1000), (309, 1009)]:
        assert few.search(vectors[row], k=1)[0].key == key
    assert all(n.key != 300 for n in few.search(vectors[299], k=5))
    # many stored since (a crash after an older save): inserted in the background
    many = VectorIndex(DIM, ann_min_size=100, start_build=builds)
    many.hold_builds()
    many.add_many(np.arange(1, 301), vectors[:300])
    many.add_many(np.arange(2000, 2100), vectors[300:400])
    assert many.adopt_graph(tmp_path / "graph.usearch", renamed)
    many.release_builds()
    assert builds.started == 1 and many.building and not many.uses_ann
    assert many.search(vectors[350], k=1)[0].key == 2050  # exact meanwhile
    builds.release.set()
    assert many.wait_built(120) and many.uses_ann
    for row, key in [(0, 1), (299, 300), (300, 2000), (399, 2099)]:
        assert many.search(vectors[row], k=1)[0].key == key
    # an unreadable file: not adopted, the index builds its own graph
    (tmp_path / "bad.usearch").write_bytes(b"not a graph")
    other = VectorIndex(DIM, ann_min_size=100, start_build=lambda job: job())
    other.hold_builds()
    other.add_many(np.arange(300), vectors[:300])
    assert not other.adopt_graph(tmp_path / "bad.usearch", renamed)
    other.release_builds()
    assert other.uses_ann and other.search(vectors[7], k=1)[0].key == 7
