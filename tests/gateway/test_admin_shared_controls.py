"""Shared runtime controls on a real redis-server, with the refresh's read held open on
purpose: a change made on this replica while a refresh was reading (its read may predate
the change) is not undone by that refresh, not even for one interval."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from sipp._client import AsyncSippClient
from sipp.gateway.auth import TokenTable
from sipp.gateway.config import parse_config
from sipp.gateway.config import tomllib as toml
from sipp.gateway.shared_controls import SharedControls
from sipp.gateway.state import GatewayState
from sipp.gateway.store.redis import RedisStore

from ..ports import free_port
from .admin_gateways import deployments, pools_toml
from .limited_gateways import toml as limited_toml
from .redis_server import running_redis
from .test_server import ENV


class HeldStore(RedisStore):
    """Redis, but each read of the controls waits for `release` after Redis answered:
    the moment a refresh holds a possibly stale copy."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.read = asyncio.Event()
        self.release = asyncio.Event()

    async def members(self, keys: Sequence[str]) -> list[set[str]]:
        out = await super().members(keys)
        self.read.set()
        await self.release.wait()
        return out


def test_a_refresh_that_read_before_a_change_does_not_undo_it(tmp_path: Path) -> None:
    ups = deployments()
    try:
        config = parse_config(
            toml.loads(
                limited_toml("http://127.0.0.1:9", free_port(), free_port()) + pools_toml(ups)
            )
        )
    finally:
        for up in ups.values():
            up.close()

    async def scenario(url: str) -> None:
        state = GatewayState(config, AsyncSippClient(), TokenTable(config.tokens, ENV))
        store = HeldStore(url)
        controls = SharedControls(state, store, "held")
        try:
            refresh = asyncio.ensure_future(controls.refresh())
            await store.read.wait()  # it holds Redis's empty blocklist and fallback table
            await controls.change("blocked_ips", "203.0.113.7", True)
            await controls.set_fallbacks("primary", (["spare2"], []))
            store.release.set()
            await refresh
            assert state.blocked_ips == {"203.0.113.7"}
            assert state.pools["primary"].resilience.fallbacks == ("spare2",)
            await controls.refresh()  # the next one reads both changes from Redis
            assert state.blocked_ips == {"203.0.113.7"}
            assert state.pools["primary"].resilience.fallbacks == ("spare2",)
        finally:
            await store.close()

    with running_redis(tmp_path) as redis:
        asyncio.run(scenario(redis.url))
