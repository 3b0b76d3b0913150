"""How a pool picks a deployment: each strategy, breakers and what one request tried."""

from __future__ import annotations

import random
from collections import Counter

from sipp.gateway.upstreams.policy import BreakerPolicy, Deployment, Resilience
from sipp.gateway.upstreams.pool import Pool


def _pool(strategy: str, weights: tuple[float, ...] = (1, 1, 1)) -> Pool:
    deps = tuple(Deployment(name, weight=w) for name, w in zip("abc", weights, strict=True))
    res = Resilience(deps, strategy, breaker=BreakerPolicy(min_requests=1, cooldown_seconds=60))  # type: ignore[arg-type]
    return Pool("t", res, random.Random(7))


def _open(pool: Pool, name: str) -> None:
    dep = next(d for d in pool.deployments if d.name == name)
    dep.breaker.record(True, probe=False)
    assert dep.breaker.state == "open"


def test_least_in_flight_never_picks_the_busiest_of_three() -> None:
    pool = _pool("least_in_flight")
    pool.deployments[1].in_flight = 5
    picks = Counter(pool.pick().name for _ in range(300))
    assert picks["b"] == 0 and picks["a"] > 50 and picks["c"] > 50


def test_weighted_follows_the_weights() -> None:
    pool = _pool("weighted", (8, 1, 1))
    picks = Counter(pool.pick().name for _ in range(1000))
    assert picks["a"] > 700 and picks["b"] > 50 and picks["c"] > 50


def test_latency_measures_each_then_prefers_the_fastest() -> None:
    pool = _pool("latency")
    seen = []
    for seconds in (0.3, 0.1, 0.2):
        dep = pool.pick()
        seen.append(dep.name)
        dep.observe_latency(seconds)
    assert sorted(seen) == ["a", "b", "c"]  # unmeasured ones first
    fastest = min(pool.deployments, key=lambda d: d.latency or 0)
    assert {pool.pick().name for _ in range(20)} == {fastest.name}


def test_open_breakers_and_tried_deployments_are_avoided() -> None:
    pool = _pool("least_in_flight")
    _open(pool, "a")
    assert {pool.pick().name for _ in range(50)} == {"b", "c"}
    assert {pool.pick(avoid={"b"}).name for _ in range(50)} == {"c"}
    assert {pool.pick(avoid={"b", "c"}).name for _ in range(50)} <= {"b", "c"}  # open stays out


def test_every_breaker_open_still_picks_one() -> None:
    pool = _pool("weighted")
    for name in "abc":
        _open(pool, name)
    assert pool.pick().name in "abc"
