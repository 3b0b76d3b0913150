"""Limits shared through Redis by two `sipp-gateway serve` replicas (a real redis-server
started here): exact across replicas, budgets never overdrawn, and Redis taken away and
brought back under load without a restart."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from ..remote.loopback import LoopbackServer
from .limited_gateways import LIMITED_CALLER, held_upstream, limited_gateway
from .redis_server import RedisServer
from .test_server import ENV, Gateway
from .upstreams import poll, text_reply

CHAT = {"model": "remote", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
RESERVED, USED = 18, 6  # see test_shaping: the estimate of CHAT, and the upstream's usage
AUTH = {"authorization": f"Bearer {LIMITED_CALLER}"}


def _state(policy: str = "fail_open") -> str:
    return f'backend = "redis"\nurl_env = "TEST_REDIS_URL"\non_unavailable = "{policy}"'


@contextmanager
def _replicas(
    directory: Path,
    redis: RedisServer,
    upstream: LoopbackServer,
    limits: str,
    policy: str = "fail_open",
) -> Iterator[tuple[Gateway, Gateway]]:
    env = {"TEST_REDIS_URL": redis.url}
    with ExitStack() as stack:
        a, b = (
            stack.enter_context(
                limited_gateway(
                    directory, upstream, limits, state=_state(policy), env=env, name=name
                )
            )
            for name in ("a", "b")
        )
        yield a, b


async def _through_both(
    replicas: tuple[Gateway, Gateway],
    n: int,
    upstream: LoopbackServer,
    release: threading.Event | None,
) -> list[int]:
    """`n` requests at once, alternating between the replicas. With `release`, the upstream
    answers only once every request reached it or was refused."""
    refused = 0

    async def one(client: httpx.AsyncClient) -> int:
        nonlocal refused
        r = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        refused += r.status_code == 429
        return r.status_code

    async def releaser() -> None:
        if release is None:
            return
        deadline = time.monotonic() + 120
        while len(upstream.requests) + refused < n and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        release.set()

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with (
        httpx.AsyncClient(base_url=replicas[0].public, limits=limits, timeout=120) as a,
        httpx.AsyncClient(base_url=replicas[1].public, limits=limits, timeout=120) as b,
    ):
        task = asyncio.ensure_future(releaser())
        statuses = await asyncio.gather(*(one(a if i % 2 else b) for i in range(n)))
        await task
    return list(statuses)


def _level(redis: RedisServer, key: str) -> float:
    reply = redis.command("HGET", key, "v")  # $<len>\r\n<value>\r\n
    return float(reply.split(b"\r\n")[1])


def test_requests_per_minute_holds_across_two_replicas(tmp_path: Path, redis: RedisServer) -> None:
    per_minute = 60
    with (
        LoopbackServer(text_reply) as upstream,
        _replicas(tmp_path, redis, upstream, f"requests_per_minute = {per_minute}") as replicas,
    ):
        started = time.monotonic()
        statuses = asyncio.run(_through_both(replicas, 3 * per_minute, upstream, None))
        elapsed = time.monotonic() - started
        admitted = statuses.count(200)
        assert statuses.count(200) + statuses.count(429) == len(statuses)
        # the bucket refills one request a second while the hammer lasts: that, and 2 %
        assert per_minute <= admitted <= per_minute * 1.02 + per_minute * elapsed / 60
        assert len(upstream.requests) == admitted
        # both replicas served and both refused: one bucket, not one per replica
        for gw in replicas:
            assert (
                gw.metric(
                    "sipp_gateway_limit_refused_total",
                    '{limit="requests_per_minute",scope="caller"}',
                )
                > 0
            )


def test_a_budget_shared_by_two_replicas_is_never_overdrawn(
    tmp_path: Path, redis: RedisServer
) -> None:
    budget = RESERVED * 25 + 7
    release = threading.Event()
    with (
        held_upstream(release) as upstream,
        _replicas(tmp_path, redis, upstream, f"tokens_per_day = {budget}") as replicas,
    ):
        statuses = asyncio.run(_through_both(replicas, 120, upstream, release))
        # every request reserved before any settled: exactly what the budget holds
        assert statuses.count(200) == 25 and statuses.count(429) == 95
        key = "sipp:caller:team:tokens_per_day"
        poll(lambda: _level(redis, key) == budget - 25 * USED, "settlements reach Redis")


def _load(replicas: tuple[Gateway, Gateway], stop: threading.Event, seen: Counter[int]) -> None:
    """Requests through both replicas, one after another, until `stop`."""
    with httpx.Client(timeout=30) as client:
        i = 0
        while not stop.is_set():
            gw = replicas[i % 2]
            i += 1
            r = client.post(f"{gw.public}/v1/chat/completions", json=CHAT, headers=AUTH)
            seen[r.status_code] += 1


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_redis_killed_and_restarted_under_load(
    tmp_path: Path, redis: RedisServer, policy: str
) -> None:
    per_minute = 40
    with (
        LoopbackServer(text_reply) as upstream,
        _replicas(
            tmp_path, redis, upstream, f"requests_per_minute = {per_minute}", policy
        ) as replicas,
    ):
        before: Counter[int] = Counter()
        stop = threading.Event()
        workers = [threading.Thread(target=_load, args=(replicas, stop, before)) for _ in range(4)]
        for w in workers:
            w.start()
        poll(lambda: before[429] > 0, "the limit refuses before Redis goes away")
        redis.stop()
        outage: Counter[int] = Counter()
        stop.set()
        for w in workers:
            w.join()
        stop.clear()
        workers = [threading.Thread(target=_load, args=(replicas, stop, outage)) for _ in range(4)]
        for w in workers:
            w.start()
        a, b = replicas
        expected = 503 if policy == "fail_closed" else 200
        poll(lambda: outage[expected] >= 10, f"{policy} answers while Redis is away")
        ready = httpx.get(f"{a.management}/readyz")
        if policy == "fail_closed":
            assert ready.status_code == 503 and "state store unavailable" in ready.text
        else:
            assert ready.status_code == 200 and "limits fail open" in ready.text
        assert a.metric("sipp_gateway_state_errors_total") > 0
        assert a.metric("sipp_gateway_state_available") == 0
        redis.start()  # same port, empty: the buckets start full again
        poll(lambda: httpx.get(f"{b.management}/readyz").text == "ready", "readiness recovers")
        after_restart = sum(outage.values())
        poll(lambda: outage[429] > 0 and sum(outage.values()) > after_restart, "limits resume")
        # Each replica's gauge follows its own last store operation (a settlement queued
        # during the outage may land after a reservation that already succeeded).
        poll(
            lambda: all(gw.metric("sipp_gateway_state_available") == 1 for gw in replicas),
            "both replicas report the store available again",
        )
        stop.set()
        for w in workers:
            w.join()
        everything = before + outage
        # no 5xx but the 503s fail_closed promises
        allowed = {200, 429} | ({503} if policy == "fail_closed" else set())
        assert set(everything) <= allowed, everything


def _admin(gw: Gateway) -> tuple[httpx.Client, dict[str, str]]:
    client = httpx.Client(base_url=gw.management, timeout=30)
    r = client.post("/admin/api/session", json={"password": ENV["TEST_ADMIN_PASSWORD"]})
    assert r.status_code == 200, r.text
    return client, {"x-sipp-admin-csrf": r.json()["csrf_token"]}


def test_runtime_controls_set_on_one_replica_hold_on_the_other(
    tmp_path: Path, redis: RedisServer
) -> None:
    """Block an IP (or disable a target) through replica A's admin API: replica B refuses
    it too, without a request to Redis on its request path (it follows Redis every 0.25 s)."""
    with (
        LoopbackServer(text_reply) as upstream,
        _replicas(tmp_path, redis, upstream, "requests_per_minute = 1000") as (a, b),
    ):
        url_b = f"{b.public}/v1/chat/completions"

        def status_b() -> int:
            return httpx.post(url_b, json=CHAT, headers=AUTH, timeout=30).status_code

        assert status_b() == 200
        admin_a, csrf_a = _admin(a)
        admin_b, csrf_b = _admin(b)
        r = admin_a.post("/admin/api/controls/block", json={"ip": "127.0.0.1"}, headers=csrf_a)
        assert r.status_code == 200, r.text
        poll(lambda: status_b() == 403, "replica B refuses the IP blocked on A")
        overview = admin_b.get("/admin/api/overview").json()
        assert overview["controls"]["blocked_ips"] == ["127.0.0.1"]
        r = admin_b.post("/admin/api/controls/unblock", json={"ip": "127.0.0.1"}, headers=csrf_b)
        assert r.status_code == 200
        poll(
            lambda: (
                httpx.post(f"{a.public}/v1/chat/completions", json=CHAT, headers=AUTH).status_code
                == 200
            ),
            "replica A serves the IP unblocked on B",
        )
        r = admin_a.post(
            "/admin/api/controls/disable_target", json={"target": "remote"}, headers=csrf_a
        )
        assert r.status_code == 200
        poll(lambda: status_b() == 503, "replica B refuses the target disabled on A")
        # Redis away: a change is refused, not made on one replica only
        redis.stop()
        r = admin_a.post(
            "/admin/api/controls/enable_target", json={"target": "remote"}, headers=csrf_a
        )
        assert r.status_code == 503 and "not made" in r.text
        assert status_b() == 503  # the last known controls hold
        redis.start()  # empty: nothing disabled any more
        poll(lambda: status_b() == 200, "the controls follow Redis again")
