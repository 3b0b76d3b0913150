"""The admin API's cache panel: per cached target, its store's totals against its caps,
what its lookups did, its semantic index and its online verification; and a purge that
empties one target's cache (its semantic index too).

Entries and bytes are read from the store (with Redis, every replica's); the counts are
this process's since it started, read from its Prometheus metrics so the panel and
/metrics never disagree. Only target names and settings are shown: never a path's
contents, a key or a cached answer.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter

from .._errors import InvalidRequestError, UnavailableError
from .cache.exact import ExactCache
from .cache.store import CacheStoreError
from .state import GatewayState

__all__ = ["cache_view", "purge_cache"]

_OUTCOMES = ("agree", "disagree", "error", "skipped")


async def cache_view(state: GatewayState) -> dict[str, Any]:
    return {"caches": [await _cache(state, cache) for cache in state.caches.values()]}


async def _cache(state: GatewayState, cache: ExactCache) -> dict[str, Any]:
    m, name, config = state.metrics, cache.target, cache.config
    try:
        totals = await cache.store.totals()
        cache.show(totals)
        stored: dict[str, Any] = {"available": True, "entries": totals.entries}
        stored["bytes"] = totals.bytes
    except CacheStoreError:  # Redis down: the counts below are still this process's
        stored = {"available": False, "entries": None, "bytes": None}
    hits, misses, bypasses = (
        _count(m.cache_requests, target=name, result=r) for r in ("hit", "miss", "bypass")
    )
    semantic = cache.semantic
    verifier = cache.verifier
    return {
        "target": name,
        "backend": config.backend,
        **stored,
        "max_entries": config.max_entries,
        "max_bytes": config.max_bytes,
        "ttl_seconds": config.ttl_seconds,
        "scope": config.scope,
        "hits": hits,
        "misses": misses,
        "bypasses": bypasses,
        "stores": _count(m.cache_stores, target=name),
        "hit_ratio": hits / (hits + misses) if hits + misses else None,
        "tokens_saved": _count(m.cache_tokens_saved, target=name),
        "errors": _count(m.cache_errors, target=name),
        "semantic": None
        if semantic is None
        else {
            "embedding_target": semantic.settings.embedding_target,
            "threshold": semantic.settings.threshold,
            "entries": len(semantic),
            "hits": _count(m.cache_semantic_hits, target=name),
            "guard_rejections": _count(m.cache_guard_rejections, target=name),
            "embedding_failures": _count(m.cache_embedding_failures, target=name),
        },
        "verification": None
        if verifier is None
        else {
            "fraction": verifier.fraction,
            "threshold": verifier.threshold if semantic is not None else None,
            **{match: _verified(state, name, match) for match in ("exact", "semantic")},
        },
    }


def _verified(state: GatewayState, name: str, match: str) -> dict[str, Any]:
    counter = state.metrics.cache_verifications
    out: dict[str, Any] = {
        outcome: _count(counter, target=name, match=match, outcome=outcome) for outcome in _OUTCOMES
    }
    judged = out["agree"] + out["disagree"]
    out["false_hit_rate"] = out["disagree"] / judged if judged else None
    return out


def _count(counter: Counter, **labels: str) -> int:
    """The total of `counter` over its series with `labels` (any other label summed)."""
    total = 0.0
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return round(total)


async def purge_cache(state: GatewayState, body: dict[str, Any]) -> dict[str, Any]:
    """Empty the cache of `body["target"]`; what the audit records of it."""
    unknown = set(body) - {"target"}
    if unknown:
        raise InvalidRequestError(f"unknown field(s): {', '.join(sorted(unknown))}")
    name = body.get("target")
    if not isinstance(name, str) or name not in state.caches:
        raise InvalidRequestError("'target' must name a target with a [targets.cache]")
    try:
        removed = await state.caches[name].purge()
    except CacheStoreError:
        raise UnavailableError("the cache store cannot be reached; nothing was purged") from None
    return {"target": name, "entries": removed}
