"""`[targets.cache]`: a target's response cache (exact, and semantic when asked), parsed
with path-named errors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ..config import LocalTarget, ProviderTarget, _Parser

__all__ = [
    "CACHE_FIELDS",
    "DEFAULT_THRESHOLD",
    "DEFAULT_VERIFY_THRESHOLD",
    "FINISH_REASONS",
    "CacheConfig",
    "SemanticConfig",
    "check_embedding_targets",
    "embedding_target_problem",
    "parse_cache",
]

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
    "semantic",
    "embedding_target",
    "similarity_threshold",
    "guard",
    "verify_fraction",
    "verify_threshold",
)
FINISH_REASONS = ("stop", "length", "tool_calls")
# all-MiniLM-L6-v2 on the shipped calibration set: 0.5 % false hits (guard on), 53 % recall.
# Another embedding model needs its own: `sipp-gateway cache calibrate`.
DEFAULT_THRESHOLD = 0.86
# Two answers whose all-MiniLM-L6-v2 embeddings are this close say the same thing in other
# words ("The sky is blue." / "the sky is blue"); different facts score well below it.
DEFAULT_VERIFY_THRESHOLD = 0.9


@dataclass(frozen=True)
class SemanticConfig:
    embedding_target: str  # a local target loaded with `embeddings = true`
    threshold: float = DEFAULT_THRESHOLD  # cosine similarity a stored question needs
    guard: bool = True  # reject candidates whose negations, numbers or antonyms differ


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
    semantic: SemanticConfig | None = None  # look up paraphrases on an exact miss
    verify_fraction: float = 0.0  # of hits also sent upstream to compare (verify.py)
    verify_threshold: float = DEFAULT_VERIFY_THRESHOLD  # answers' cosine that still agrees


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
    semantic = _semantic(p, raw, where)
    fraction = _unit(p, raw, "verify_fraction", where, 0.0, zero=True)
    verify_threshold = _unit(p, raw, "verify_threshold", where, DEFAULT_VERIFY_THRESHOLD)
    if "verify_threshold" in raw and semantic is None:
        p.fail(
            f"{where}.verify_threshold",
            "is only read with semantic = true (answers are compared by its embedding target)",
        )
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
        semantic,
        fraction,
        verify_threshold,
    )


def _semantic(p: _Parser, raw: Mapping[str, Any], where: str) -> SemanticConfig | None:
    on = _flag(p, raw, "semantic", where, False)
    name = p.string(raw, "embedding_target", where, required=on)
    threshold = _unit(p, raw, "similarity_threshold", where, DEFAULT_THRESHOLD)
    guard = _flag(p, raw, "guard", where, True)
    if not on:
        for key in ("embedding_target", "similarity_threshold", "guard"):
            if key in raw:
                p.fail(f"{where}.{key}", "is only read with semantic = true")
        return None
    return SemanticConfig(name or "", threshold, guard)


def check_embedding_targets(p: _Parser, targets: tuple[LocalTarget | ProviderTarget, ...]) -> None:
    """Every semantic cache's `embedding_target` names a local target that embeds: the
    cache embeds through the gateway's own endpoint for it, never a provider (which
    would send every question out, and bill it)."""
    by_name = {t.name: t for t in targets}
    for i, target in enumerate(targets):
        semantic = target.cache.semantic if target.cache is not None else None
        if semantic is None:
            continue
        problem = embedding_target_problem(by_name, semantic.embedding_target)
        if problem is not None:
            p.fail(f"targets[{i}].cache.embedding_target", problem)


def embedding_target_problem(
    targets: Mapping[str, LocalTarget | ProviderTarget], name: str
) -> str | None:
    """Why target `name` cannot embed for the gateway, or None when it can."""
    embedder = targets.get(name)
    if embedder is None:
        return f"no target named {name!r}"
    if embedder.type != "local":
        return f"{embedder.name!r} is a {embedder.type} target; it must be local"
    if not embedder.runtime.context.embeddings:
        return (
            f"{embedder.name!r} is not loaded for embeddings "
            "(set [targets.runtime.context] embeddings = true)"
        )
    return None


def _unit(
    p: _Parser, table: Mapping[str, Any], key: str, where: str, default: float, zero: bool = False
) -> float:
    """A number in (0, 1], or [0, 1] with `zero`."""
    value = table.get(key, default)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not ((value >= 0 if zero else value > 0) and value <= 1):
        p.fail(f"{where}.{key}", f"must be a number in {'[0' if zero else '(0'}, 1]")
        return default
    return float(value)


def _flag(p: _Parser, table: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        p.fail(f"{path}.{key}", "must be true or false")
        return default
    return value
