"""`[[route_rules]]`: conditional routing rules, parsed with path-named errors.

The TOML name is `route_rules` because `[routes]` is already the table of public and
management paths (TOML cannot make one key both a table and an array of tables).
Rules are grouped by the public name they `match`, in file order. `check` refuses a
rule that can never match (min > max tokens, a caller label no token has, a rule
after an unconditional one, a cache condition on a target without a cache, a near miss
in a cache that is not semantic or at or above its hit threshold, examples without a
local embedding target) and a routed name that is not itself a target unless its last
enforced rule matches every request: otherwise some requests for it would get a 404
nobody intended.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .cache.config import embedding_target_problem
from .route_examples import DEFAULT_EXAMPLES_THRESHOLD, Examples

if TYPE_CHECKING:
    from .config import LocalTarget, ProviderTarget, TokenConfig, _Parser

__all__ = [
    "CACHE_STATES",
    "ROUTE_FIELDS",
    "CacheState",
    "RouteRule",
    "parse_route_rules",
    "routed_names",
]

ROUTE_FIELDS = (
    "name",
    "match",
    "target",
    "mode",
    "min_prompt_tokens",
    "max_prompt_tokens",
    "has_tools",
    "has_json_schema",
    "callers",
    "cache",
    "cache_target",
    "near_miss_threshold",
    "examples",
    "examples_threshold",
    "examples_guard",
    "embedding_target",
)
# What a target's cache holds for a request: its answer (`hit`), a stored question of the
# semantic cache at least `near_miss_threshold` similar but no hit (`near_miss`), or
# neither (`miss`: no hit, so it includes near misses; order a near_miss rule first).
CACHE_STATES = ("hit", "near_miss", "miss")
CacheState = Literal["hit", "near_miss", "miss"]


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One rule: every condition that is not None must hold for `target` to be chosen."""

    name: str
    match: str
    target: str
    mode: Literal["enforce", "shadow"] = "enforce"
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None
    has_tools: bool | None = None
    has_json_schema: bool | None = None
    callers: frozenset[str] | None = None
    cache: CacheState | None = None
    cache_target: str | None = None  # whose cache `cache` looks in (None: `target`'s)
    near_miss_threshold: float | None = None  # with cache = "near_miss"
    examples: Examples | None = None  # the semantic-match condition

    @property
    def unconditional(self) -> bool:
        return (
            self.min_prompt_tokens is None
            and self.max_prompt_tokens is None
            and self.has_tools is None
            and self.has_json_schema is None
            and self.callers is None
            and self.cache is None
            and self.examples is None
        )

    @property
    def counts_tokens(self) -> bool:
        return self.min_prompt_tokens is not None or self.max_prompt_tokens is not None


def routed_names(value: Any) -> set[str]:
    """The public names the rules match, read before the rules are checked: a token's
    allowlist may name them."""
    if not isinstance(value, list):
        return set()
    return {
        rule["match"]
        for rule in value
        if isinstance(rule, Mapping) and isinstance(rule.get("match"), str)
    }


def parse_route_rules(
    p: _Parser,
    value: Any,
    targets: Sequence[LocalTarget | ProviderTarget],
    tokens: Sequence[TokenConfig],
) -> dict[str, tuple[RouteRule, ...]]:
    """The rules by the public name they match (empty when there are none)."""
    if not isinstance(value, list):
        p.fail("route_rules", "must be an array of [[route_rules]] tables")
        return {}
    by_name = {t.name: t for t in targets}
    labels = {t.caller for t in tokens}
    grouped: dict[str, list[tuple[str, RouteRule]]] = {}
    names: set[str] = set()
    for i, table in enumerate(value):
        path = f"route_rules[{i}]"
        if not isinstance(table, Mapping):
            p.fail(path, "must be a table")
            continue
        rule = _rule(p, table, path, by_name, labels)
        if rule is None:
            continue
        if rule.name in names:
            p.fail(f"{path}.name", f"duplicates another rule named {rule.name!r}")
        names.add(rule.name)
        grouped.setdefault(rule.match, []).append((path, rule))
    for match, rules in grouped.items():
        _check_order(p, match, rules, match in by_name)
    return {match: tuple(rule for _, rule in rules) for match, rules in grouped.items()}


def _rule(
    p: _Parser,
    table: Mapping[str, Any],
    path: str,
    targets: Mapping[str, LocalTarget | ProviderTarget],
    labels: set[str],
) -> RouteRule | None:
    p.keys(table, path, ROUTE_FIELDS)
    name = p.string(table, "name", path)
    match = p.string(table, "match", path)
    target = p.string(table, "target", path)
    if target is not None and target not in targets:
        p.fail(f"{path}.target", f"references unknown target {target!r}")
        target = None
    mode = p.choice(table, "mode", path, ("enforce", "shadow"), "enforce")
    low = p.integer(table, "min_prompt_tokens", path, None, 0)
    high = p.integer(table, "max_prompt_tokens", path, None, 1)
    if low is not None and high is not None and low > high:
        p.fail(f"{path}.min_prompt_tokens", f"is above max_prompt_tokens ({high}): never matches")
    tools = _flag(p, table, "has_tools", path)
    schema = _flag(p, table, "has_json_schema", path)
    callers = _callers(p, table, path, labels)
    cache = p.choice(table, "cache", path, CACHE_STATES, "hit") if "cache" in table else None
    looks_in = p.string(table, "cache_target", path, required=False)
    elsewhere = cache in ("miss", "near_miss")  # a hit answers from the chosen target's cache
    if looks_in is not None and not elsewhere:
        p.fail(f"{path}.cache_target", 'is only read with cache = "miss" or "near_miss"')
    cache_of = looks_in if elsewhere and looks_in is not None else target
    chosen = targets.get(cache_of) if cache_of is not None else None
    if looks_in is not None and chosen is None:
        p.fail(f"{path}.cache_target", f"references unknown target {looks_in!r}")
    elif cache is not None and chosen is not None and chosen.cache is None:
        where = f"{path}.cache_target" if looks_in is not None else f"{path}.cache"
        p.fail(
            where, f"looks in the cache of target {cache_of!r}, which has none: add [targets.cache]"
        )
    near = _near_miss(p, table, path, cache, chosen)
    examples = _examples(p, table, path, targets, target, looks_in)
    if name is None or match is None or target is None:
        return None
    return RouteRule(
        name,
        match,
        target,
        mode,  # type: ignore[arg-type]
        low,
        high,
        tools,
        schema,
        callers,
        cache,  # type: ignore[arg-type]
        looks_in if elsewhere else None,
        near,
        examples,
    )


def _near_miss(
    p: _Parser,
    table: Mapping[str, Any],
    path: str,
    cache: str | None,
    looked: LocalTarget | ProviderTarget | None,
) -> float | None:
    """`near_miss_threshold`: required with cache = "near_miss", below the hit threshold of
    the semantic cache looked in (at or above it, a near miss could never happen)."""
    where = f"{path}.near_miss_threshold"
    if cache != "near_miss":
        if "near_miss_threshold" in table:
            p.fail(where, 'is only read with cache = "near_miss"')
        return None
    semantic = looked.cache.semantic if looked is not None and looked.cache is not None else None
    owner = looked.name if looked is not None else ""
    if looked is not None and looked.cache is not None and semantic is None:
        p.fail(
            f"{path}.cache",
            f'"near_miss" needs a semantic cache: target {owner!r} has an exact one '
            "only (set semantic = true in its [targets.cache])",
        )
    if "near_miss_threshold" not in table:
        p.fail(where, 'is required with cache = "near_miss"')
        return None
    value = _fraction(p, table, "near_miss_threshold", path, 0.5)
    if semantic is not None and value >= semantic.threshold:
        p.fail(
            where,
            f"must be below the similarity_threshold of target {owner!r}'s cache "
            f"({semantic.threshold}): at or above it a near miss is a hit",
        )
    return value


def _examples(
    p: _Parser,
    table: Mapping[str, Any],
    path: str,
    targets: Mapping[str, LocalTarget | ProviderTarget],
    target: str | None,
    looks_in: str | None,
) -> Examples | None:
    """The semantic-match condition: `examples` and the settings read with them."""
    if "examples" not in table:
        for key in ("examples_threshold", "examples_guard", "embedding_target"):
            if key in table:
                p.fail(f"{path}.{key}", "is only read with examples")
        return None
    raw = table["examples"]
    texts: tuple[str, ...] = ()
    if (
        not isinstance(raw, list)
        or not raw
        or not all(isinstance(t, str) and t.strip() for t in raw)
    ):
        p.fail(f"{path}.examples", "must be a non-empty array of non-blank strings")
    else:
        texts = tuple(raw)
    threshold = _fraction(p, table, "examples_threshold", path, DEFAULT_EXAMPLES_THRESHOLD)
    guard = _flag(p, table, "examples_guard", path)
    where = f"{path}.embedding_target"
    name = p.string(table, "embedding_target", path, required=False)
    if "embedding_target" not in table:
        name = _cache_embedder(targets, (target, looks_in))
        if name is None and target is not None:  # an unknown target is reported already
            p.fail(
                where,
                f"is required with examples: target {target!r} has no semantic cache "
                "whose embedding_target the rule could use",
            )
    elif name is not None:
        problem = embedding_target_problem(targets, name)
        if problem is not None:
            p.fail(where, problem)
            name = None
    if not texts or name is None:
        return None
    return Examples(texts, name, threshold, True if guard is None else guard)


def _cache_embedder(
    targets: Mapping[str, LocalTarget | ProviderTarget], names: tuple[str | None, ...]
) -> str | None:
    """The embedding target of the first of `names` with a semantic cache."""
    for name in names:
        found = targets.get(name) if name is not None else None
        if found is not None and found.cache is not None and found.cache.semantic is not None:
            return found.cache.semantic.embedding_target
    return None


def _fraction(p: _Parser, table: Mapping[str, Any], key: str, path: str, default: float) -> float:
    """A similarity in (0, 1]."""
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        p.fail(f"{path}.{key}", "must be a number in (0, 1]")
        return default
    return float(value)


def _flag(p: _Parser, table: Mapping[str, Any], key: str, path: str) -> bool | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, bool):
        p.fail(f"{path}.{key}", "must be true or false")
        return None
    return value


def _callers(
    p: _Parser, table: Mapping[str, Any], path: str, labels: set[str]
) -> frozenset[str] | None:
    if "callers" not in table:
        return None
    value = table["callers"]
    where = f"{path}.callers"
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        p.fail(where, "must be a non-empty array of caller labels")
        return None
    for j, label in enumerate(value):
        if label not in labels:
            p.fail(f"{where}[{j}]", f"no [[tokens]] has caller {label!r}: never matches")
    return frozenset(value)


def _check_order(
    p: _Parser, match: str, rules: list[tuple[str, RouteRule]], is_target: bool
) -> None:
    catch_all: str | None = None  # the path of an enforced rule that takes every request
    for path, rule in rules:
        if catch_all is not None:
            p.fail(path, f"comes after {catch_all}, which takes every request for {match!r}")
        elif rule.mode == "enforce" and rule.unconditional:
            catch_all = path
    if not is_target and catch_all is None:
        p.fail(
            rules[-1][0],
            f"{match!r} is not a target: end its rules with an enforced one without "
            "conditions, or requests no rule takes get 404",
        )
