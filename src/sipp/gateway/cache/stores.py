"""Open each cached target's store at startup, and close them all at shutdown."""

from __future__ import annotations

import contextlib
import sqlite3
from typing import TYPE_CHECKING

from ..._errors import InvalidConfigError
from ..config import GatewayConfig
from .exact import ExactCache
from .store import CacheStore, CacheStoreError

if TYPE_CHECKING:
    from ..metrics import GatewayMetrics
    from ..store import Store

__all__ = ["close_caches", "open_caches"]


async def open_caches(
    config: GatewayConfig, state_store: Store | None, metrics: GatewayMetrics
) -> dict[str, ExactCache]:
    """Every cached target's `ExactCache`, its store opened (a SQLite file that cannot be
    created fails startup, naming the target), its totals on /metrics."""
    caches: dict[str, ExactCache] = {}
    for target in config.targets:
        settings = target.cache
        if settings is None:
            continue
        store: CacheStore
        if settings.backend == "redis":
            from ..store.redis import RedisStore
            from .redis_store import RedisCacheStore

            # the parser requires [state] backend = "redis" for this backend
            assert isinstance(state_store, RedisStore)
            prefix = f"{config.state.key_prefix}:cache:{target.name}"
            store = RedisCacheStore(
                state_store.client, prefix, settings.max_entries, settings.max_bytes
            )
        else:
            from .sqlite_store import SqliteStore, store_file

            assert settings.path is not None  # required by the parser for this backend
            path = store_file(settings.path, target.name)
            store = SqliteStore(path, settings.max_entries, settings.max_bytes)
            try:
                store.open()
            except (OSError, sqlite3.Error) as exc:
                raise InvalidConfigError(
                    f"targets {target.name!r} cache: cannot open {path}: {exc}"
                ) from None
        cache = caches[target.name] = ExactCache(target.name, settings, store, metrics)
        with contextlib.suppress(CacheStoreError):  # Redis down: shown on the first store
            cache.show(await store.totals())
    return caches


async def close_caches(caches: dict[str, ExactCache]) -> None:
    for cache in caches.values():
        await cache.close()
