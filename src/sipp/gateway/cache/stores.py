"""Open each cached target's store at startup, and close them all at shutdown."""

from __future__ import annotations

import contextlib
import sqlite3
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..._errors import InvalidConfigError
from ..config import GatewayConfig, LocalTarget
from .exact import ExactCache
from .semantic_stage import Embedder, SemanticStage, model_id
from .store import CacheStore, CacheStoreError
from .verify import Upstream, Verifier

if TYPE_CHECKING:
    from ..metrics import GatewayMetrics
    from ..store import Store

__all__ = ["close_caches", "open_caches", "stop_verifying"]


async def open_caches(
    caches: dict[str, ExactCache],
    config: GatewayConfig,
    state_store: Store | None,
    metrics: GatewayMetrics,
    embedder: Callable[[str], Embedder] | None = None,
    upstream: Callable[[str], Upstream] | None = None,
) -> None:
    """Put every cached target's `ExactCache` in `caches`, its store opened (a SQLite file
    that cannot be created fails startup, naming the target), its totals on /metrics;
    with `semantic = true`, its semantic stage embedding through `embedder(embedding
    target name)`, its index rebuilt in the background from the vectors the store keeps
    with the entries; with `verify_fraction` > 0, its verifier asking `upstream(target
    name)`. Each goes in as soon as it is opened: when a later target fails, the caller
    closes `caches` (`close_caches`) and so stops the readers already started."""
    local = {t.name: t for t in config.targets if isinstance(t, LocalTarget)}
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
        semantic = settings.semantic
        if semantic is not None and embedder is not None:
            # the parser checked it names a local target loaded for embeddings
            # ANN graphs are kept beside a SQLite store (a Redis one has no directory)
            graphs = (
                settings.path / f"{urllib.parse.quote(target.name, safe='')}.graphs"
                if settings.path is not None
                else None
            )
            cache.semantic = SemanticStage(
                target.name,
                semantic,
                model_id(local[semantic.embedding_target]),
                embedder(semantic.embedding_target),
                metrics,
                settings.ttl_seconds,
                settings.max_entries,
                graphs=graphs,
            )
            cache.semantic.start(store)  # rebuilds its index from the store's records
        if settings.verify_fraction > 0 and upstream is not None:
            cache.verifier = Verifier(
                target.name,
                settings.verify_fraction,
                settings.verify_threshold,
                metrics,
                upstream(target.name),
                embedder(semantic.embedding_target) if semantic and embedder else None,
                cache.semantic,
            )
        with contextlib.suppress(CacheStoreError):  # Redis down: shown on the first store
            cache.show(await store.totals())


async def stop_verifying(caches: dict[str, ExactCache]) -> None:
    """Cancel the verifications in flight: before the client closes under them."""
    for cache in caches.values():
        if cache.verifier is not None:
            await cache.verifier.close()


async def close_caches(caches: dict[str, ExactCache]) -> None:
    for cache in caches.values():
        await cache.close()
