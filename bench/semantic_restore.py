"""How long a gateway takes to get its semantic index back after a restart (or a crash).

Per size: a SQLite cache store (or, with --redis-url, a Redis one) is filled through its
public `put` with N entries, each carrying its semantic record (one partition, 384-dim
vectors: random directions, not MiniLM embeddings, which this bench does not compute);
then a fresh store and `SemanticStage` are opened as `sipp-gateway serve` opens them, and
the bench times:

* restore: until the index holds every record (requests miss semantically before that),
           and the longest the event loop was held meanwhile (a 5 ms ticker's worst gap);
* graph:   past `ANN_MIN_SIZE` entries, until the background ANN graph is built;
* search:  one partition search (no embedding, no guard hit) while the graph builds
           (exact over the matrix) and after (through the graph), median over queries;
* memory:  resident memory the restored index added;
* restart: (SQLite) the stage closed, saving its graph beside the store, and opened again:
           until restored with the saved graph in use (no build).

    python bench/semantic_restore.py [--entries 10000 100000] [--redis-url redis://...]
                                     [--restore-only]  (no waiting for the graph)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sipp.gateway.cache.config import SemanticConfig  # noqa: E402
from sipp.gateway.cache.entry import SemanticRecord  # noqa: E402
from sipp.gateway.cache.semantic_stage import SemanticStage  # noqa: E402
from sipp.gateway.cache.sqlite_store import SqliteStore  # noqa: E402
from sipp.gateway.cache.store import CacheStore  # noqa: E402
from sipp.gateway.metrics import GatewayMetrics  # noqa: E402

MODEL = "all-MiniLM-L6-v2.f16.gguf:bench:mean"
DIM = 384
PARTITION = "bench-partition"
VALUE = b'{"v":1,"choices":[{"text":"The sky is blue.","finish":"stop"}]}'


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _no_embedder(text: str) -> np.ndarray:
    raise AssertionError("the bench never embeds")


def _stage(kind: str, where: str, size: int) -> SemanticStage:
    settings = SemanticConfig("minilm", 0.9, True)
    graphs = Path(where) / "bench.graphs" if kind == "sqlite" else None
    metrics = GatewayMetrics(dict)
    return SemanticStage("t", settings, MODEL, _no_embedder, metrics, 86400, size, graphs=graphs)


def _open(kind: str, where: str, entries: int) -> CacheStore:
    if kind == "sqlite":
        store = SqliteStore(Path(where) / "bench.sqlite3", entries, 1 << 40)
        store.open()
        return store
    import redis.asyncio as aioredis

    from sipp.gateway.cache.redis_store import RedisCacheStore

    return RedisCacheStore(aioredis.Redis.from_url(where), "bench:cache:t", entries, 1 << 40)


async def fill(store: CacheStore, vectors: np.ndarray) -> float:
    started = time.perf_counter()
    for i, vector in enumerate(vectors):
        record = SemanticRecord(PARTITION, f"question number {i}", MODEL, vector)
        await store.put(f"key-{i:07d}", VALUE, 86400, record)
    return time.perf_counter() - started


def searches(stage: SemanticStage, vectors: np.ndarray, count: int = 30) -> float:
    times = []
    for i in range(0, len(vectors), max(1, len(vectors) // count)):
        t = time.perf_counter()
        stage.search(PARTITION, "an unrelated question", vectors[i])
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


async def run(size: int, kind: str, where: str, graph: bool) -> None:
    vectors = np.random.default_rng(size).standard_normal((size, DIM)).astype(np.float32)
    store = _open(kind, where, size)
    print(f"\n{size:,} entries ({kind})")
    print(f"  fill through put():   {await fill(store, vectors):7.1f} s")
    await store.close()
    gc.collect()
    before = rss_mib()
    store = _open(kind, where, size)
    stage = _stage(kind, where, size)
    started = time.perf_counter()
    stage.start(store)
    worst = 0.0
    while not stage.restored.is_set():
        tick = time.perf_counter()
        await asyncio.sleep(0.005)
        worst = max(worst, time.perf_counter() - tick - 0.005)
    restored = time.perf_counter() - started
    print(f"  restore:              {restored:7.2f} s  ({len(stage):,} questions)")
    print(f"  event loop held:      {worst * 1e3:7.0f} ms at most")
    during = searches(stage, vectors)
    if not graph:
        print(f"  search while building: {during:6.2f} ms (exact)")
        await stage.close()
        await store.close()
        return
    built = threading.Event()
    threading.Thread(target=lambda: (stage.wait_built(), built.set()), daemon=True).start()
    while not built.is_set():
        await asyncio.sleep(0.1)
    graph = time.perf_counter() - started - restored
    print(f"  graph (background):   {graph:7.1f} s")
    print(f"  search while building: {during:6.2f} ms (exact)")
    print(f"  search after:          {searches(stage, vectors):6.2f} ms")
    print(f"  memory added:         {rss_mib() - before:7.0f} MiB")
    started = time.perf_counter()
    await stage.close()
    await store.close()
    if kind == "sqlite":
        print(f"  close (graph saved):  {time.perf_counter() - started:7.2f} s")
        store = _open(kind, where, size)
        stage = _stage(kind, where, size)
        started = time.perf_counter()
        stage.start(store)
        await stage.restored.wait()
        reused = time.perf_counter() - started
        assert stage.wait_built(0), "the saved graph was not reused"
        print(f"  restart, graph reused: {reused:6.2f} s")
        print(f"  search after restart:  {searches(stage, vectors):6.2f} ms")
        await stage.close()
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--redis-url", help="measure the Redis store (flushes its database)")
    parser.add_argument("--restore-only", action="store_true", help="skip the graph build")
    args = parser.parse_args()
    for size in args.entries:
        if args.redis_url:
            import redis

            redis.Redis.from_url(args.redis_url).flushdb()
            asyncio.run(run(size, "redis", args.redis_url, not args.restore_only))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                asyncio.run(run(size, "sqlite", tmp, not args.restore_only))


if __name__ == "__main__":
    main()
