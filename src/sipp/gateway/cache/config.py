"""`[targets.cache]`: a target's exact response cache, parsed with path-named errors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ..config import _Parser

__all__ = ["CACHE_FIELDS", "FINISH_REASONS", "CacheConfig", "parse_cache"]

CACHE_FIELDS = (
    "enabled",
    "backend",
    "path",
    "ttl_seconds",
    "max_entries",
    "max_bytes",
    "scope",
    "store_finish",
    "cache_sampled",
)
FINISH_REASONS = ("stop", "length", "tool_calls")


@dataclass(frozen=True)
class CacheConfig:
    backend: Literal["sqlite", "redis"] = "sqlite"
    path: Path | None = None  # the directory of the SQLite files (backend "sqlite")
    ttl_seconds: int = 3600  # absolute: a hit never extends it
    max_entries: int = 10_000
    max_bytes: int = 64 << 20  # of stored answers
    scope: Literal["caller", "shared"] = "caller"
    store_finish: frozenset[str] = frozenset({"stop"})
    cache_sampled: bool = False  # also cache requests with temperature > 0 (or unset)


def parse_cache(
    p: _Parser, table: Mapping[str, Any], path: str, state_backend: str
) -> CacheConfig | None:
    """`path.cache`, or None when the table is absent or says `enabled = false`."""
    if "cache" not in table:
        return None
    raw, where = table["cache"], f"{path}.cache"
    if not isinstance(raw, Mapping):
        p.fail(where, "must be a table")
        return None
    p.keys(raw, where, CACHE_FIELDS)
    enabled = _flag(p, raw, "enabled", where, True)
    backend = p.choice(raw, "backend", where, ("sqlite", "redis"), "sqlite")
    directory = p.string(raw, "path", where, required=backend == "sqlite")
    if backend == "redis":
        if directory is not None:
            p.fail(f"{where}.path", 'is only read with backend = "sqlite"')
        if state_backend != "redis":
            p.fail(
                f"{where}.backend", '"redis" uses the [state] Redis: set [state] backend = "redis"'
            )
    ttl = p.integer(raw, "ttl_seconds", where, 3600, 1) or 3600
    max_entries = p.integer(raw, "max_entries", where, 10_000, 1) or 10_000
    max_bytes = p.integer(raw, "max_bytes", where, 64 << 20, 1) or 64 << 20
    scope = p.choice(raw, "scope", where, ("caller", "shared"), "caller")
    finish = raw.get("store_finish", ["stop"])
    if (
        not isinstance(finish, list)
        or not finish
        or not all(isinstance(f, str) and f in FINISH_REASONS for f in finish)
    ):
        p.fail(f"{where}.store_finish", f"must be a non-empty array of {', '.join(FINISH_REASONS)}")
        finish = ["stop"]
    sampled = _flag(p, raw, "cache_sampled", where, False)
    if not enabled:
        return None
    return CacheConfig(
        backend,  # type: ignore[arg-type]
        Path(directory) if directory is not None else None,
        ttl,
        max_entries,
        max_bytes,
        scope,  # type: ignore[arg-type]
        frozenset(finish),
        sampled,
    )


def _flag(p: _Parser, table: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        p.fail(f"{path}.{key}", "must be true or false")
        return default
    return value
