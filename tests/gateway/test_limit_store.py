"""The state stores under random interleavings of reserve, settle and cancel: the
in-memory store and the Redis scripts (a real redis-server) both agree with a plain
model of the buckets, so no bucket ever leaves its bounds."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipp.gateway.store import Bucket, Store
from sipp.gateway.store.memory import MemoryStore
from sipp.gateway.store.redis import RedisStore

from .redis_server import RedisServer, running_redis

# Periods so long that refill during a test is far below one token: levels are exact.
FOREVER = 10**12
CAPACITY = 50

Op = tuple[str, int, int]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("settle"), st.integers(0, 100), st.integers(0, 40)),
        st.tuples(st.just("cancel"), st.integers(0, 100), st.just(0)),
    ),
    max_size=40,
)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _buckets(prefix: str) -> list[Bucket]:
    return [
        Bucket(f"{prefix}:rpm", CAPACITY // 5, FOREVER),  # counts requests
        Bucket(f"{prefix}:tpm", CAPACITY, FOREVER),
        Bucket(f"{prefix}:tpd", CAPACITY + 7, FOREVER, window=True),
    ]


def _replay(loop: asyncio.AbstractEventLoop, store: Store, prefix: str, script: list[Op]) -> None:
    buckets = _buckets(prefix)
    model = [float(b.capacity) for b in buckets]
    outstanding: list[int] = []  # tokens of each reservation not yet settled or cancelled

    def apply(deltas: list[int]) -> None:
        for i, delta in enumerate(deltas):
            model[i] = min(float(buckets[i].capacity), model[i] - delta)

    for op, a, b in script:
        if op == "reserve":
            amounts = [1, a, a]
            grant = loop.run_until_complete(store.reserve(buckets, amounts))
            # an amount of nothing always passes (a probe), even on a bucket in debt
            expected = all(
                amount == 0 or level >= amount for level, amount in zip(model, amounts, strict=True)
            )
            assert grant.ok == expected, (op, a, model)
            if grant.ok:
                apply(amounts)
                outstanding.append(a)
            else:
                assert grant.retry_after is not None and grant.retry_after > 0
        elif outstanding:
            tokens = outstanding.pop(a % len(outstanding))
            deltas = [0, b - tokens, b - tokens] if op == "settle" else [-1, -tokens, -tokens]
            loop.run_until_complete(store.adjust(buckets, deltas))
            apply(deltas)
        probe = loop.run_until_complete(store.reserve(buckets, [0, 0, 0]))
        assert probe.ok
        for level, expected_level, bucket in zip(probe.levels, model, buckets, strict=True):
            assert level.remaining <= bucket.capacity
            assert int(level.remaining) == pytest.approx(int(expected_level), abs=1)
    # every reservation given back: each bucket is exactly what settlements charged
    for tokens in outstanding:
        loop.run_until_complete(store.adjust(buckets, [-1, -tokens, -tokens]))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(script=ops)
def test_memory_store_matches_the_model(loop: asyncio.AbstractEventLoop, script: list[Op]) -> None:
    store = MemoryStore(clock=lambda: 1_700_000_000.0)  # a frozen clock: no refill at all
    _replay(loop, store, "m", script)


_counter = iter(range(10**9))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(script=ops)
def test_redis_store_matches_the_model(
    loop: asyncio.AbstractEventLoop, redis_server: RedisServer, script: list[Op]
) -> None:
    store = RedisStore(redis_server.url)
    try:
        _replay(loop, store, f"h{next(_counter)}", script)
    finally:
        loop.run_until_complete(store.close())


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_concurrent_reservations_never_overdraw(
    loop: asyncio.AbstractEventLoop, redis_server: RedisServer, backend: str
) -> None:
    """200 reservations at once on several connections: exactly what the bucket holds."""
    store: Store = MemoryStore() if backend == "memory" else RedisStore(redis_server.url)
    bucket = [Bucket(f"c:{backend}", 1000, FOREVER)]

    async def hammer() -> list[bool]:
        grants = await asyncio.gather(*(store.reserve(bucket, [7]) for _ in range(200)))
        return [g.ok for g in grants]

    try:
        granted = loop.run_until_complete(hammer())
        assert granted.count(True) == 1000 // 7
        left = loop.run_until_complete(store.reserve(bucket, [0])).levels[0].remaining
        assert int(left) == 1000 - 7 * (1000 // 7)
    finally:
        loop.run_until_complete(store.close())


def test_refusals_say_when_to_retry_and_windows_start_over(loop: asyncio.AbstractEventLoop) -> None:
    now = [1_700_000_000.0]
    store = MemoryStore(clock=lambda: now[0])
    bucket = [Bucket("r", 60, 60_000)]  # 60 a minute: one a second
    assert loop.run_until_complete(store.reserve(bucket, [60])).ok
    refused = loop.run_until_complete(store.reserve(bucket, [3]))
    assert not refused.ok and refused.retry_after == pytest.approx(3.0)
    never = loop.run_until_complete(store.reserve(bucket, [61]))
    assert not never.ok and never.retry_after is None  # more than the capacity: never
    now[0] += 3
    assert loop.run_until_complete(store.reserve(bucket, [3])).ok

    day = [Bucket("d", 10, 86_400_000, window=True)]
    now[0] = 86_400 * 20_000 + 86_000.0  # 400 s before a UTC midnight
    assert loop.run_until_complete(store.reserve(day, [10])).ok
    refused = loop.run_until_complete(store.reserve(day, [1]))
    assert refused.retry_after == pytest.approx(400.0)
    now[0] += 400
    assert loop.run_until_complete(store.reserve(day, [10])).ok


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    amounts=st.lists(st.integers(1, 40), min_size=1, max_size=60),
    used=st.lists(st.integers(0, 40), min_size=60, max_size=60),
    backend=st.sampled_from(["memory", "redis"]),
)
def test_concurrent_reserve_and_settle_keep_the_bucket_exact(
    loop: asyncio.AbstractEventLoop,
    redis_server: RedisServer,
    amounts: list[int],
    used: list[int],
    backend: str,
) -> None:
    """Reservations racing each other (several Redis connections), then their settlements
    racing too: what was granted never exceeds the bucket, and afterwards the bucket holds
    exactly its capacity minus what the settlements charged."""
    store: Store = (
        MemoryStore(clock=lambda: 1_700_000_000.0)
        if backend == "memory"
        else RedisStore(redis_server.url)
    )
    bucket = [Bucket(f"race:{next(_counter)}", 200, FOREVER)]

    async def race() -> tuple[list[bool], float]:
        grants = await asyncio.gather(*(store.reserve(bucket, [a]) for a in amounts))
        ok = [g.ok for g in grants]
        settles = [
            store.adjust(bucket, [min(u, a) - a])  # a refund of what the run did not use
            for a, u, granted in zip(amounts, used, ok, strict=False)
            if granted
        ]
        await asyncio.gather(*settles)
        return ok, (await store.reserve(bucket, [0])).levels[0].remaining

    try:
        ok, level = loop.run_until_complete(race())
    finally:
        loop.run_until_complete(store.close())
    granted = [a for a, g in zip(amounts, ok, strict=True) if g]
    assert sum(granted) <= 200
    charged = sum(min(u, a) for a, u, g in zip(amounts, used, ok, strict=False) if g)
    assert int(level) == 200 - charged
