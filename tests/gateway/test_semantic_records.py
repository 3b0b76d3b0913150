"""Semantic records kept by the cache stores with their entries: written with the entry,
gone with it (replaced, expired, evicted), read back in the order stored from a cursor,
per embedding model. SQLite on a file, Redis on a real `redis-server`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import redis.asyncio as aioredis

from sipp.gateway.cache.config import SemanticConfig
from sipp.gateway.cache.entry import SemanticRecord, decode_record, encode_record
from sipp.gateway.cache.redis_store import RedisCacheStore
from sipp.gateway.cache.semantic_stage import SemanticStage
from sipp.gateway.cache.sqlite_store import SqliteStore
from sipp.gateway.cache.store import CacheStore, RecordPage
from sipp.gateway.metrics import GatewayMetrics

from .redis_server import running_redis
from .test_cache_units import Clock

MODEL, OTHER = "minilm.gguf:1:mean", "minilm.gguf:1:cls"


def _record(text: str, model: str = MODEL, partition: str = "part") -> SemanticRecord:
    seed = sum(text.encode())
    vector = np.random.default_rng(seed).standard_normal(8).astype(np.float32)
    return SemanticRecord(partition, text, model, vector)


async def _all(store: CacheStore, model: str = MODEL, after: int = 0) -> RecordPage:
    found, cursor = [], after
    while True:
        page = await store.records(model, cursor, limit=2)  # small pages: the cursor is used
        found += page.records
        if page.cursor == cursor:
            return RecordPage(found, cursor)
        cursor = page.cursor


def test_a_record_round_trips_and_a_bad_one_reads_as_none() -> None:
    record = _record("how do I reset my password?\nnow")
    back = decode_record(encode_record(record))
    assert back is not None and back.text == record.text and back.model == MODEL
    assert back.vector.dtype == np.float32 and np.array_equal(back.vector, record.vector)
    for bad in (b"", b"not json\n1234", b'{"v":1}\n1234', encode_record(record)[:-1]):
        assert decode_record(bad) is None


async def _records_follow_their_entries(
    store: CacheStore,
    tick: Callable[[], Awaitable[None]],
    expire: Callable[[], Awaitable[None]],
) -> None:
    """`store` keeps 4 entries; `tick` lets its clock move on; `expire` ends every TTL."""
    for key, record in [
        ("a", _record("first")),
        ("b", _record("second")),
        ("c", _record("other model", OTHER)),
        ("plain", None),  # an entry without a record
    ]:
        await store.put(key, key.encode(), 60, record)
        await tick()
    first = await _all(store)
    assert [r.key for r in first.records] == ["a", "b"]
    got = first.records[0]
    assert got.record.text == "first" and got.record.partition == "part"
    assert np.array_equal(got.record.vector, _record("first").vector)
    assert 0 < got.ttl_left <= 60
    assert [r.key for r in (await _all(store, OTHER)).records] == ["c"]
    # replacing an entry replaces its record; only what came after the cursor is new
    await store.put("a", b"A2", 60, _record("first, again"))
    since = await _all(store, after=first.cursor)
    assert [(r.key, r.record.text) for r in since.records] == [("a", "first, again")]
    # replaced without a record: the old record goes
    await store.put("b", b"B2", 60)
    assert [r.key for r in (await _all(store)).records] == ["a"]
    # past the cap the least recently used entry ("c") is evicted, its record with it
    await tick()
    await store.put("d", b"D", 60, _record("fourth"))
    assert [r.key for r in (await _all(store)).records] == ["a", "d"]
    assert (await _all(store, OTHER)).records == []
    # an expired entry's record is not read back
    await expire()
    assert (await _all(store)).records == []


def test_sqlite_records_follow_their_entries(tmp_path: Path) -> None:
    clock = Clock()

    async def tick() -> None:
        clock.now += 1

    async def expire() -> None:
        clock.now += 61

    async def run() -> None:
        store = SqliteStore(tmp_path / "t.sqlite3", 4, 1 << 20, clock)
        store.open()
        try:
            assert not store.shared
            await _records_follow_their_entries(store, tick, expire)
            # a store after expiry sweeps the entries, and their records with them
            await store.put("e", b"E", 60)
            count = await store._run(
                lambda db: db.execute("SELECT count(*) FROM semantic").fetchone()[0]
            )
            assert count == 0
        finally:
            await store.close()

    asyncio.run(run())


def test_sqlite_records_survive_reopening(tmp_path: Path) -> None:
    """What a crashed process wrote (WAL committed, the store never closed) is read back."""
    clock = Clock()

    async def write() -> None:
        store = SqliteStore(tmp_path / "t.sqlite3", 10, 1 << 20, clock)
        store.open()
        await store.put("k", b"V", 60, _record("kept"))
        # no close(): as if killed

    async def read() -> list[str]:
        store = SqliteStore(tmp_path / "t.sqlite3", 10, 1 << 20, clock)
        store.open()
        try:
            return [r.record.text for r in (await _all(store)).records]
        finally:
            await store.close()

    asyncio.run(write())
    assert asyncio.run(read()) == ["kept"]


def test_redis_records_follow_their_entries(tmp_path: Path) -> None:
    with running_redis(tmp_path) as server:

        async def run() -> None:
            client = aioredis.Redis.from_url(server.url)
            try:
                store = RedisCacheStore(client, "t:cache:remote", 4, 1 << 20)
                assert store.shared

                async def tick() -> None:
                    await asyncio.sleep(0.005)  # Redis's clock orders uses by the millisecond

                async def expire() -> None:
                    # Redis's own expiry, as if the TTL ran out: the value and record go
                    for key in await client.keys("t:cache:remote:*e:*"):
                        await client.pexpire(key, 1)
                    for key in await client.keys("t:cache:remote:sem:*:r:*"):
                        await client.pexpire(key, 1)
                    while await client.keys("t:cache:remote:sem:*:r:*"):
                        await asyncio.sleep(0.01)

                await _records_follow_their_entries(store, tick, expire)
                # two stores on one prefix (two replicas) see each other's records
                other = RedisCacheStore(client, "t:cache:remote", 4, 1 << 20)
                await other.put("z", b"Z", 60, _record("from the other replica"))
                assert [r.key for r in (await _all(store)).records] == ["z"]
                # another target's prefix is another namespace
                elsewhere = RedisCacheStore(client, "t:cache:elsewhere", 4, 1 << 20)
                assert (await _all(elsewhere)).records == []
                # Redis restarted empty: its numbers start again, and are read again
                cursor = (await _all(store)).cursor
                await client.flushall()
                await other.put("y", b"Y", 60, _record("after the restart"))
                assert [r.key for r in (await store.records(MODEL, cursor)).records] == ["y"]
            finally:
                await client.aclose()

        asyncio.run(run())


def test_a_stage_rebuilds_its_index_from_the_store(tmp_path: Path) -> None:
    """What a restart reads back: this model's live records only, the newest
    `max_entries` of them, with the expiry they had (a restart does not extend it)."""
    clock = Clock()
    texts = ["first", "second", "third", "fourth", "other model"]

    async def run() -> None:
        store = SqliteStore(tmp_path / "t.sqlite3", 100, 1 << 20, clock)
        store.open()
        await store.put("old", b"v", 5, _record("stale"))  # expires before the restart
        for i, text in enumerate(texts):
            clock.now += 1
            model = OTHER if text == "other model" else MODEL
            await store.put(text, b"v", 60, _record(text, model, partition=f"p{i % 2}"))
        clock.now += 10
        metrics = GatewayMetrics(dict)
        stage = SemanticStage("t", SemanticConfig("e"), MODEL, _never, metrics, 60, 3, clock)
        stage.start(store)
        await asyncio.wait_for(stage.restored.wait(), 60)
        assert len(stage) == 3  # "first" was the oldest past max_entries = 3
        for i, text in enumerate(texts):
            found = stage.search(f"p{i % 2}", text, _record(text).vector)[0]
            assert found == (text if text in ("second", "third", "fourth") else None)
        assert stage.search("part", "stale", _record("stale").vector)[0] is None
        clock.now += 47  # 60 s after "second" was stored, 59 s after "third"
        stage.search("p1", "second", _record("second").vector)  # expiry is swept by use
        assert len(stage) == 2
        await stage.close()
        await store.close()

    asyncio.run(run())


async def _never(text: str) -> npt.NDArray[np.float32]:
    raise AssertionError("nothing is embedded here")


def test_a_clean_restart_reuses_the_saved_graph(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past `ann_min_size` the graph saved at shutdown is taken back at startup instead of
    built again: renamed to the new keys, without the entries gone since, with those
    stored since inserted (searched exactly until they are)."""
    clock = Clock()
    vectors = np.random.default_rng(5).standard_normal((400, 32)).astype(np.float32)
    graphs = tmp_path / "t.graphs"

    def stage() -> SemanticStage:
        metrics = GatewayMetrics(dict)
        return SemanticStage(
            "t", SemanticConfig("e"), MODEL, _never, metrics, 600, 1000, clock, graphs, 100
        )

    async def put(store: SqliteStore, i: int) -> None:
        await store.put(f"k{i}", b"v", 600, SemanticRecord("p", f"q{i}", MODEL, vectors[i]))

    async def run() -> None:
        store = SqliteStore(tmp_path / "t.sqlite3", 1000, 1 << 20, clock)
        store.open()
        for i in range(300):
            await put(store, i)
        first = stage()
        first.start(store)
        await asyncio.wait_for(first.restored.wait(), 60)
        assert await asyncio.to_thread(first.wait_built, 120)
        await first.close()
        assert len(list(graphs.rglob("*.usearch"))) == 1
        for i in range(300, 340):  # stored after the save (by a later run that crashed)
            await put(store, i)
        await store.put("k5", b"v", 600)  # replaced without a vector: its record goes
        second = stage()
        with caplog.at_level(logging.INFO, logger="sipp.gateway"):
            second.start(store)
            await asyncio.wait_for(second.restored.wait(), 60)
        assert "1 saved ANN graphs reused" in caplog.text
        # the 40 stored since go into it in the background (more than are inserted at once)
        assert await asyncio.to_thread(second.wait_built, 120)
        assert len(second) == 339
        for i in (0, 150, 299, 300, 339):
            assert second.search("p", f"q{i}", vectors[i])[0] == f"k{i}"
        assert second.search("p", "q5", vectors[5])[0] != "k5"
        await second.close()
        await store.close()

    asyncio.run(run())
