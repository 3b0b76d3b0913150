"""A target's resilience settings from TOML: its deployments, how one is picked, when
to retry, where to fall back, and when a deployment's breaker opens.

A target without any of these keys gets `Resilience()`: one deployment (itself), one
attempt, no fallbacks — exactly the behaviour of a plain target.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:  # the parser imports this module to read these keys
    from ..config import _Parser

__all__ = [
    "RESILIENCE_KEYS",
    "RETRY_ON",
    "BreakerPolicy",
    "Deployment",
    "Problems",
    "Resilience",
    "RetryPolicy",
    "check_references",
    "parse_resilience",
]

Strategy = Literal["least_in_flight", "weighted", "latency"]
STRATEGIES = ("least_in_flight", "weighted", "latency")
RETRY_ON = ("connect", "timeout", "429", "5xx")
RESILIENCE_KEYS = (
    "deployments",
    "strategy",
    "retry",
    "breaker",
    "fallbacks",
    "context_fallbacks",
    "max_attempts",
)
_URL = re.compile(r"^https?://[^\s/?#]+(/[^\s?#]*)?$")


@dataclass(frozen=True)
class Deployment:
    """One place a target's requests can go: an upstream base URL with its own key,
    or another target of this gateway (`target`)."""

    name: str
    base_url: str | None = None
    secret_env: str | None = None
    weight: float = 1.0
    target: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 1  # on this target, the first one included
    backoff_base_seconds: float = 0.1
    backoff_cap_seconds: float = 2.0
    on: frozenset[str] = frozenset(RETRY_ON)
    retry_after_cap_seconds: float = 5.0
    # A stream is held until its first content or this long, then committed.
    first_token_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class BreakerPolicy:
    window_seconds: float = 30.0
    min_requests: int = 5
    failure_rate: float = 0.5
    cooldown_seconds: float = 10.0
    # Also opens after this many failures in a row (0: off): a dead deployment among
    # many successes would otherwise take most of a window to reach the rate.
    consecutive_failures: int = 5


@dataclass(frozen=True)
class Resilience:
    deployments: tuple[Deployment, ...] = ()  # empty: the target itself is its one deployment
    strategy: Strategy = "least_in_flight"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    fallbacks: tuple[str, ...] = ()
    context_fallbacks: tuple[str, ...] = ()
    max_attempts: int = 5  # per request (each of its n choices), fallbacks included

    @property
    def has_alternatives(self) -> bool:
        """True when a failed attempt has somewhere else to go (then a stream is held)."""
        return (
            len(self.deployments) > 1
            or self.retry.attempts > 1
            or bool(self.fallbacks)
            or bool(self.context_fallbacks)
        )


def parse_resilience(p: _Parser, table: Mapping[str, Any], path: str, kind: str) -> Resilience:
    """The resilience keys of target table `table` at `path` (of type `kind`)."""
    deployments: tuple[Deployment, ...] = ()
    if "deployments" in table:
        if kind in ("openai", "openai_compatible", "anthropic"):
            deployments = _deployments(p, table["deployments"], f"{path}.deployments", kind)
        else:
            p.fail(f"{path}.deployments", "is only allowed on provider targets")
    strategy = p.choice(table, "strategy", path, STRATEGIES, "least_in_flight")
    retry = _retry(p, table.get("retry", {}), f"{path}.retry")
    breaker = _breaker(p, table.get("breaker", {}), f"{path}.breaker")
    fallbacks = _names(p, table, "fallbacks", path)
    context_fallbacks = _names(p, table, "context_fallbacks", path)
    max_attempts = p.integer(table, "max_attempts", path, 5, 1) or 5
    return Resilience(
        deployments,
        strategy,  # type: ignore[arg-type]
        retry,
        breaker,
        fallbacks,
        context_fallbacks,
        max_attempts,
    )


def _deployments(p: _Parser, value: Any, path: str, kind: str) -> tuple[Deployment, ...]:
    if not isinstance(value, list) or not value:
        p.fail(path, "must be a non-empty array of [[deployments]] tables")
        return ()
    secret_key = "token_env" if kind == "openai_compatible" else "api_key_env"
    out: list[Deployment] = []
    names: set[str] = set()
    for i, table in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(table, Mapping):
            p.fail(where, "must be a table")
            continue
        p.keys(table, where, ("name", "base_url", secret_key, "weight", "target"))
        target = p.string(table, "target", where, required=False)
        base_url = p.string(table, "base_url", where, required=False)
        secret = p.env_name(table, secret_key, where, required=False)
        if target is not None and (base_url is not None or secret is not None):
            p.fail(where, f"a deployment is either target = ... or base_url/{secret_key}")
        if target is None:
            if base_url is None and kind == "openai_compatible":
                p.fail(f"{where}.base_url", "is required (or target = another target)")
            if base_url is not None and not _URL.match(base_url):
                p.fail(f"{where}.base_url", "must be an absolute http(s) URL")
        weight = table.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            p.fail(f"{where}.weight", "must be a positive number")
            weight = 1
        name = p.string(table, "name", where, required=False)
        if name is None:
            name = target or (urlsplit(base_url).netloc if base_url else None) or str(i)
        if name in names:
            p.fail(f"{where}.name", f"duplicates deployment {name!r}; give each a distinct name")
        names.add(name)
        out.append(Deployment(name, base_url, secret, float(weight), target))
    return tuple(out)


def _seconds(p: _Parser, table: Mapping[str, Any], key: str, path: str, default: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        p.fail(f"{path}.{key}", "must be a number of seconds >= 0")
        return default
    return float(value)


def _retry(p: _Parser, table: Any, path: str) -> RetryPolicy:
    if not isinstance(table, Mapping):
        p.fail(path, "must be a table")
        return RetryPolicy()
    keys = (
        "attempts",
        "backoff_base_seconds",
        "backoff_cap_seconds",
        "on",
        "retry_after_cap_seconds",
        "first_token_timeout_seconds",
    )
    p.keys(table, path, keys)
    d = RetryPolicy()
    on = table.get("on", list(RETRY_ON))
    if not isinstance(on, list) or any(item not in RETRY_ON for item in on):
        p.fail(f"{path}.on", f"must be an array of {', '.join(RETRY_ON)}")
        on = list(RETRY_ON)
    base = _seconds(p, table, "backoff_base_seconds", path, d.backoff_base_seconds)
    cap = _seconds(p, table, "backoff_cap_seconds", path, d.backoff_cap_seconds)
    if cap < base:
        p.fail(f"{path}.backoff_cap_seconds", "must be >= backoff_base_seconds")
    first = _seconds(p, table, "first_token_timeout_seconds", path, d.first_token_timeout_seconds)
    if first == 0:
        p.fail(f"{path}.first_token_timeout_seconds", "must be greater than zero")
    return RetryPolicy(
        p.integer(table, "attempts", path, 1, 1) or 1,
        base,
        cap,
        frozenset(on),
        _seconds(p, table, "retry_after_cap_seconds", path, d.retry_after_cap_seconds),
        first or d.first_token_timeout_seconds,
    )


def _breaker(p: _Parser, table: Any, path: str) -> BreakerPolicy:
    if not isinstance(table, Mapping):
        p.fail(path, "must be a table")
        return BreakerPolicy()
    p.keys(
        table,
        path,
        (
            "window_seconds",
            "min_requests",
            "failure_rate",
            "cooldown_seconds",
            "consecutive_failures",
        ),
    )
    d = BreakerPolicy()
    rate = table.get("failure_rate", d.failure_rate)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        p.fail(f"{path}.failure_rate", "must be a number in (0, 1]")
        rate = d.failure_rate
    window = _seconds(p, table, "window_seconds", path, d.window_seconds)
    if window == 0:
        p.fail(f"{path}.window_seconds", "must be greater than zero")
    return BreakerPolicy(
        window or d.window_seconds,
        p.integer(table, "min_requests", path, d.min_requests, 1) or d.min_requests,
        float(rate),
        _seconds(p, table, "cooldown_seconds", path, d.cooldown_seconds),
        p.integer(table, "consecutive_failures", path, d.consecutive_failures, 0) or 0,
    )


def _names(p: _Parser, table: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        p.fail(f"{path}.{key}", "must be an array of target names")
        return ()
    return tuple(value)


class Problems(Protocol):
    """Where a check reports what is wrong: the config parser, or an admin edit."""

    def fail(self, path: str, rule: str) -> None: ...


def check_references(p: Problems, targets: Sequence[tuple[str, str, Resilience]]) -> None:
    """Across targets (`path`, `name`, settings): every fallback and deployment target
    exists, and no chain of fallbacks or deployments leads back to where it started."""
    by_name = {name: res for _, name, res in targets}
    for path, name, res in targets:
        for key, names in (
            ("fallbacks", res.fallbacks),
            ("context_fallbacks", res.context_fallbacks),
        ):
            for j, other in enumerate(names):
                if other not in by_name:
                    p.fail(f"{path}.{key}[{j}]", f"references unknown target {other!r}")
                elif other == name:
                    p.fail(f"{path}.{key}[{j}]", "a target cannot fall back to itself")
        for j, dep in enumerate(res.deployments):
            if dep.target is None:
                continue
            where = f"{path}.deployments[{j}].target"
            if dep.target not in by_name:
                p.fail(where, f"references unknown target {dep.target!r}")
            elif dep.target == name:
                p.fail(where, "a target cannot be its own deployment")
            elif any(d.target is not None for d in by_name[dep.target].deployments):
                p.fail(where, f"target {dep.target!r} is itself a pool of targets")
        loop = _loop(name, by_name)
        if loop:
            p.fail(f"{path}.fallbacks", "fallbacks loop: " + " -> ".join(loop))


def _loop(start: str, by_name: Mapping[str, Resilience]) -> list[str]:
    """A chain of (context) fallbacks from `start` back to `start`, if there is one."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        name, chain = stack.pop()
        res = by_name.get(name)
        if res is None:
            continue
        for other in (*res.fallbacks, *res.context_fallbacks):
            if other == start and len(chain) > 1:
                return [*chain, other]
            if other not in seen and other != start:
                seen.add(other)
                stack.append((other, [*chain, other]))
    return []
