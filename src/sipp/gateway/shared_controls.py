"""Runtime controls every replica shares through Redis: the IP blocklist, the
disabled targets, the edited fallback rules an operator set in any replica's admin
API (a rule is a hash field per target holding its two lists as JSON; a target without
one has the lists of its TOML) and the per-client rate limit's override (a hash field
holding the setting as JSON; none: `[security.rate_limit]`), and the admin audit list
(a capped Redis list of JSON entries, newest first). The per-client buckets themselves
are in Redis too (`limits.SharedRateLimiter`), installed here.

A request still checks its replica's own sets (no Redis call on the hot path); each
replica refreshes them from Redis every `INTERVAL_S`, so a change made on one replica
holds on all within a second. A change is written to Redis first: when Redis cannot be
reached the admin API says so and nothing changes, rather than one replica drifting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._errors import InvalidRequestError, UnavailableError
from .limits import RateLimitSetting, SharedRateLimiter
from .store import Store, StoreUnavailable
from .upstreams.fallback_rules import apply_rules

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
        self.fallbacks_key = f"{prefix}:controls:fallbacks"
        self.settings_key = f"{prefix}:controls:settings"  # field "rate_limit"
        self.prefix = prefix
        self._rate_limit = RateLimitSetting.configured(state.config.security)
        self._install(self._rate_limit)
        self.audit_key = f"{prefix}:admin:audit"
        self._bad_rules: object = None  # the last rules refused, so they are logged once
        # Changes made here so far: a refresh whose read overlapped one drops what it read
        # (it may predate the change, which would then flicker back for a moment).
        self._changes = 0

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
        self._changes += 1
        local = self._local(name)
        (local.add if present else local.discard)(member)

    async def set_fallbacks(
        self, target: str, rule: tuple[Sequence[str], Sequence[str]] | None
    ) -> None:
        """Store `target`'s (fallbacks, context_fallbacks), or drop its edit (None: back
        to its TOML), then apply it here. The caller has checked it."""
        value = None if rule is None else json.dumps([list(rule[0]), list(rule[1])])
        try:
            await self.store.set_field(self.fallbacks_key, target, value)
        except StoreUnavailable:
            raise UnavailableError(
                "the shared state (Redis) is unavailable: the change was not made"
            ) from None
        pool = self.state.pools[target]
        if rule is None:
            rule = (pool.configured.fallbacks, pool.configured.context_fallbacks)
        self._changes += 1
        pool.set_fallbacks(*rule)

    async def set_rate_limit(self, setting: RateLimitSetting | None) -> None:
        """Override the per-client rate limit on every replica, or drop the override
        (None: back to `[security.rate_limit]`), then apply it here."""
        value = None if setting is None else json.dumps(setting._asdict())
        try:
            await self.store.set_field(self.settings_key, "rate_limit", value)
        except StoreUnavailable:
            raise UnavailableError(
                "the shared state (Redis) is unavailable: the change was not made"
            ) from None
        self._changes += 1
        self._apply_rate_limit(setting)

    def _apply_rate_limit(self, setting: RateLimitSetting | None) -> None:
        setting = setting or RateLimitSetting.configured(self.state.config.security)
        if setting != self._rate_limit:  # the usual case is none: the buckets stay as they are
            self._rate_limit = setting
            self._install(setting)

    def _install(self, setting: RateLimitSetting) -> None:
        self.state.rate_limiter = (
            SharedRateLimiter(
                self.store,
                self.prefix,
                setting.requests_per_minute,
                setting.burst,
                fail_closed=self.state.config.state.on_unavailable == "fail_closed",
                metrics=self.state.metrics,
            )
            if setting.enabled
            else None
        )

    async def push_audit(self, entry: Mapping[str, Any], cap: int) -> None:
        """Add an admin audit entry to the list every replica reads (its `cap` newest
        kept); `StoreUnavailable` when Redis cannot be reached."""
        await self.store.push_capped(self.audit_key, json.dumps(entry), cap)

    async def audit(self, cap: int) -> list[dict[str, Any]]:
        """Every replica's audit entries, newest first; `StoreUnavailable` as above."""
        out = []
        for raw in await self.store.head(self.audit_key, cap):
            with contextlib.suppress(ValueError):
                entry = json.loads(raw)
                if isinstance(entry, dict):  # another writer's junk is skipped, not shown
                    out.append(entry)
        return out

    def _apply_fallbacks(self, stored: dict[str, str]) -> None:
        pools = self.state.pools
        rules: dict[str, tuple[Sequence[str], Sequence[str]]] = {
            name: (pool.configured.fallbacks, pool.configured.context_fallbacks)
            for name, pool in pools.items()
        }
        for name, raw in stored.items():
            rule = _rule(raw)
            if name in pools and rule is not None:
                rules[name] = rule
        now = {
            n: (p.resilience.fallbacks, p.resilience.context_fallbacks) for n, p in pools.items()
        }
        if all((tuple(f), tuple(c)) == now[n] for n, (f, c) in rules.items()):
            return  # the usual case: nothing changed since the last refresh
        problems = apply_rules(pools, rules)
        if problems and stored != self._bad_rules:
            # Another replica with another configuration wrote them: keep the last good table.
            self._bad_rules = dict(stored)
            logger.warning("shared fallback rules not applied: %s", "; ".join(problems))

    async def refresh(self) -> None:
        """Make this replica's sets Redis's (in place: the request path holds them)."""
        changes = self._changes
        values = await self.store.members([self.keys[name] for name in SETS])
        stored = await self.store.fields(self.fallbacks_key)
        settings = await self.store.fields(self.settings_key)
        if changes != self._changes:
            return
        for name, members in zip(SETS, values, strict=True):
            local = self._local(name)
            if local != members:
                local.intersection_update(members)
                local.update(members)
        self._apply_fallbacks(stored)
        self._apply_rate_limit(_setting(settings.get("rate_limit")))

    async def run(self) -> None:
        while True:
            with contextlib.suppress(StoreUnavailable):  # keep the last known controls
                await self.refresh()
            await asyncio.sleep(INTERVAL_S)


def _rule(raw: str) -> tuple[list[str], list[str]] | None:
    """A stored rule, or None when it is not the two lists of names this module writes."""
    try:
        value: Any = json.loads(raw)
    except ValueError:
        return None
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in value)
    ):
        return value[0], value[1]
    return None


def _setting(raw: str | None) -> RateLimitSetting | None:
    """A stored rate limit override, or None (none, or not what this module writes)."""
    try:
        value: Any = json.loads(raw) if raw is not None else None
        if isinstance(value, dict) and set(value) == set(RateLimitSetting._fields):
            return RateLimitSetting.parse(value)
    except (ValueError, InvalidRequestError):
        pass
    return None


def shared_controls(state: GatewayState, store: Store | None) -> SharedControls | None:
    """Shared controls when the state store is Redis; None for one process's memory."""
    from .store.memory import MemoryStore

    if store is None or isinstance(store, MemoryStore):
        return None
    from .store.redis import RedisStore

    assert isinstance(store, RedisStore)
    return SharedControls(state, store, state.config.state.key_prefix)
