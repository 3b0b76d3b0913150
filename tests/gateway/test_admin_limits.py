"""The admin API's usage of each caller's and target's limits and budgets: read from
the state store without charging anything (the in-memory store and the Redis script,
a real redis-server), and live on a `sipp-gateway serve`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sipp.gateway.store import Bucket, Store
from sipp.gateway.store.memory import MemoryStore
from sipp.gateway.store.redis import RedisStore

from ..remote.loopback import LoopbackServer
from .admin_gateways import admin_gateway, chat, deployments, login, upstream
from .redis_server import RedisServer, running_redis
from .test_server import ENV
from .upstreams import poll

__all__ = ["upstream"]  # fixtures shared with the other admin tests

DAY = 86_400_000
USED = 6  # the loopback upstream's usage for `chat` (prompt + completion tokens)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


def _store(backend: str, redis_server: RedisServer) -> Store:
    return MemoryStore() if backend == "memory" else RedisStore(redis_server.url)


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_peek_reads_levels_and_changes_nothing(backend: str, redis_server: RedisServer) -> None:
    store = _store(backend, redis_server)
    prefix = f"peek-{backend}"
    minute = Bucket(f"{prefix}:tpm", 600, 60_000)
    day = Bucket(f"{prefix}:tpd", 1000, DAY, window=True)
    fresh = Bucket(f"{prefix}:fresh", 50, 60_000)

    async def scenario() -> None:
        assert (await store.reserve([minute, day], [100, 300])).ok
        await store.adjust([day], [-200])  # a settlement's refund
        raw = redis_server.command("HGETALL", day.key)
        levels = await store.peek([minute, day, fresh])
        assert 500 <= levels[0].remaining <= 600  # refilled a little, never past capacity
        assert levels[1].remaining == 900  # a window does not refill
        assert levels[2].remaining == 50 and levels[2].reset_s == 0  # never used: full
        assert 0 < levels[1].reset_s <= DAY / 1000
        if backend == "redis":  # nothing written: the used key as it was, the other absent
            assert redis_server.command("HGETALL", day.key) == raw
            assert redis_server.command("EXISTS", fresh.key) == b":0\r\n"
        # peeking again and again takes nothing: a reservation of everything still passes
        for _ in range(3):
            await store.peek([day])
        assert (await store.reserve([day], [900])).ok
        assert (await store.peek([day]))[0].remaining == 0

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.run_until_complete(store.close())
        loop.close()


def _usage(client: httpx.Client) -> dict[str, dict[str, Any]]:
    r = client.get("/admin/api/usage")
    assert r.status_code == 200, r.text
    for secret in ENV.values():  # caller labels only, never a token
        assert secret not in r.text
    body = r.json()
    assert body["available"]
    return {f"{u['scope']}:{u['name']}:{u['limit']}": u for u in body["limits"]}


def _check_usage_moves(client: httpx.Client, send: Any) -> None:
    before = _usage(client)
    assert set(before) == {
        "caller:team:requests_per_minute",
        "caller:team:tokens_per_minute",
        "caller:team:tokens_per_day",
        "target:remote:requests_per_minute",
        "target:remote:tokens_per_day",
    }
    day = before["caller:team:tokens_per_day"]
    assert day["capacity"] == 1_000_000 and day["used"] + day["remaining"] == 1_000_000
    assert before["target:remote:requests_per_minute"]["capacity"] == 500
    for _ in range(3):
        send()
    # Settled with the upstream's usage (in the background): the day budgets are exact.
    for key in ("caller:team:tokens_per_day", "target:remote:tokens_per_day"):
        poll(
            lambda key=key: _usage(client)[key]["used"] == before[key]["used"] + 3 * USED,
            f"{key} used grows by {3 * USED}",
        )
    after = _usage(client)
    # a continuously refilled bucket: what it is short of is at most what was taken
    rpm = after["caller:team:requests_per_minute"]
    assert 0 <= rpm["used"] <= before["caller:team:requests_per_minute"]["used"] + 3
    assert after["caller:team:tokens_per_day"]["reset_seconds"] > 0


def test_usage_on_the_memory_store(tmp_path: Path, upstream: LoopbackServer) -> None:
    ups = deployments()
    try:
        with admin_gateway(tmp_path, upstream, ups) as gw:
            client, _ = login(gw)
            _check_usage_moves(client, lambda: chat(gw, "remote").raise_for_status())
            # a caller the limits do not name, and a target without limits: not listed
            assert chat(gw, "spare1").status_code == 200
            assert all(u["name"] in ("team", "remote") for u in _usage(client).values())
    finally:
        for up in ups.values():
            up.close()


def test_usage_on_redis_is_every_replicas(
    tmp_path: Path, upstream: LoopbackServer, redis_server: RedisServer
) -> None:
    """Requests through one replica show in the other's usage; Redis taken away: the
    usage says it is unavailable instead of failing."""
    ups = deployments()
    env = {"TEST_REDIS_URL": redis_server.url}
    state = 'backend = "redis"\nurl_env = "TEST_REDIS_URL"\nkey_prefix = "usage"'
    try:
        with (
            admin_gateway(tmp_path, upstream, ups, state, env, name="a") as a,
            admin_gateway(tmp_path, upstream, ups, state, env, name="b") as b,
        ):
            client_b, _ = login(b)
            _check_usage_moves(client_b, lambda: chat(a, "remote").raise_for_status())
    finally:
        for up in ups.values():
            up.close()


def test_usage_when_redis_is_away(tmp_path: Path, upstream: LoopbackServer) -> None:
    ups = deployments()
    try:
        with running_redis(tmp_path) as redis:
            env = {"TEST_REDIS_URL": redis.url}
            state = 'backend = "redis"\nurl_env = "TEST_REDIS_URL"'
            with admin_gateway(tmp_path, upstream, ups, state, env) as gw:
                client, _ = login(gw)
                assert _usage(client)
                redis.stop()
                r = client.get("/admin/api/usage")
                assert r.status_code == 200 and r.json() == {
                    "backend": "redis",
                    "available": False,
                    "limits": [],
                }
                redis.start()
                poll(
                    lambda: client.get("/admin/api/usage").json()["available"],
                    "usage is back with Redis",
                )
                assert len(_usage(client)) == 5
    finally:
        for up in ups.values():
            up.close()
