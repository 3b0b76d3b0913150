"""Runtime controls every replica shares through Redis: the IP blocklist and the
disabled targets an operator set in any replica's admin API.

A request still checks its replica's own sets (no Redis call on the hot path); each
replica refreshes them from Redis every `INTERVAL_S`, so a change made on one replica
holds on all within a second. A change is written to Redis first: when Redis cannot be
reached the admin API says so and nothing changes, rather than one replica drifting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from .._errors import UnavailableError
from .store import Store, StoreUnavailable

if TYPE_CHECKING:
    from .state import GatewayState
    from .store.redis import RedisStore

__all__ = ["INTERVAL_S", "SharedControls", "shared_controls"]

logger = logging.getLogger("sipp.gateway")

INTERVAL_S = 0.25
SETS = ("blocked_ips", "disabled_targets")


class SharedControls:
    def __init__(self, state: GatewayState, store: RedisStore, prefix: str) -> None:
        self.state, self.store = state, store
        self.keys = {name: f"{prefix}:controls:{name}" for name in SETS}

    def _local(self, name: str) -> set[str]:
        local: set[str] = getattr(self.state, name)
        return local

    async def change(self, name: str, member: str, present: bool) -> None:
        """Add `member` to (or remove it from) the shared set `name`, then this replica's."""
        try:
            await self.store.set_member(self.keys[name], member, present)
        except StoreUnavailable:
            raise UnavailableError(
                "the shared state (Redis) is unavailable: the change was not made"
            ) from None
        local = self._local(name)
        (local.add if present else local.discard)(member)

    async def refresh(self) -> None:
        """Make this replica's sets Redis's (in place: the request path holds them)."""
        values = await self.store.members([self.keys[name] for name in SETS])
        for name, members in zip(SETS, values, strict=True):
            local = self._local(name)
            if local != members:
                local.intersection_update(members)
                local.update(members)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(StoreUnavailable):  # keep the last known controls
                await self.refresh()
            await asyncio.sleep(INTERVAL_S)


def shared_controls(state: GatewayState, store: Store | None) -> SharedControls | None:
    """Shared controls when the state store is Redis; None for one process's memory."""
    from .store.memory import MemoryStore

    if store is None or isinstance(store, MemoryStore):
        return None
    from .store.redis import RedisStore

    assert isinstance(store, RedisStore)
    return SharedControls(state, store, state.config.state.key_prefix)
