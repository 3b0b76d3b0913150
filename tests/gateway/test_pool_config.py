"""The TOML of pools, retries, fallbacks and breakers: what parses, and every mistake
reported with its path, all of them in one `sipp-gateway check` run."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sipp.gateway.config import ConfigError, ProviderTarget, parse_config
from sipp.gateway.upstreams.policy import Resilience

from .test_config import BASE

POOL: dict[str, Any] = {
    "name": "gpt",
    "type": "openai_compatible",
    "model": "m",
    "strategy": "latency",
    "fallbacks": ["local"],
    "context_fallbacks": ["local"],
    "max_attempts": 4,
    "retry": {
        "attempts": 3,
        "backoff_base_seconds": 0.2,
        "backoff_cap_seconds": 1,
        "on": ["connect", "5xx"],
        "retry_after_cap_seconds": 2,
        "first_token_timeout_seconds": 3,
    },
    "breaker": {
        "window_seconds": 10,
        "min_requests": 4,
        "failure_rate": 0.25,
        "cooldown_seconds": 5,
    },
    "deployments": [
        {"name": "eu", "base_url": "http://eu.example/v1", "token_env": "EU_KEY", "weight": 3},
        {"base_url": "http://us.example:8000/v1"},
        {"target": "local"},
    ],
}


def _config(*targets: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["targets"] += copy.deepcopy(list(targets))
    return data


def _problems(*targets: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(_config(*targets))
    return info.value.problems


def test_a_pool_parses() -> None:
    target = parse_config(_config(POOL)).targets[1]
    assert isinstance(target, ProviderTarget)
    res = target.resilience
    assert [d.name for d in res.deployments] == ["eu", "us.example:8000", "local"]
    assert res.deployments[0].secret_env == "EU_KEY" and res.deployments[0].weight == 3
    assert res.deployments[2].target == "local" and res.deployments[2].base_url is None
    assert res.strategy == "latency" and res.max_attempts == 4
    assert res.retry.attempts == 3 and res.retry.on == frozenset({"connect", "5xx"})
    assert res.retry.first_token_timeout_seconds == 3
    assert res.breaker.min_requests == 4 and res.breaker.failure_rate == 0.25
    assert res.breaker.consecutive_failures == 5  # the default
    assert res.fallbacks == ("local",) and res.has_alternatives


def test_a_target_without_the_keys_is_a_pool_of_itself() -> None:
    target = parse_config(BASE).targets[0]
    assert target.resilience == Resilience() and not target.resilience.has_alternatives


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"strategy": "random"}, "targets[1].strategy: must be one of least_in_flight, weighted"),
        ({"fallbacks": ["nope"]}, "targets[1].fallbacks[0]: references unknown target 'nope'"),
        ({"fallbacks": ["gpt"]}, "targets[1].fallbacks[0]: a target cannot fall back to itself"),
        ({"context_fallbacks": "local"}, "targets[1].context_fallbacks: must be an array"),
        ({"max_attempts": 0}, "targets[1].max_attempts: must be greater than zero"),
        ({"retry": {"attempts": 0}}, "targets[1].retry.attempts: must be greater than zero"),
        ({"retry": {"on": ["418"]}}, "targets[1].retry.on: must be an array of connect, timeout"),
        ({"retry": {"tries": 2}}, "targets[1].retry.tries: unknown field"),
        (
            {"retry": {"backoff_base_seconds": 2, "backoff_cap_seconds": 1}},
            "targets[1].retry.backoff_cap_seconds: must be >= backoff_base_seconds",
        ),
        (
            {"retry": {"retry_after_cap_seconds": -1}},
            "targets[1].retry.retry_after_cap_seconds: must be a number of seconds >= 0",
        ),
        ({"breaker": {"failure_rate": 2}}, "targets[1].breaker.failure_rate: must be a number"),
        ({"breaker": {"min_requests": 0}}, "targets[1].breaker.min_requests: must be greater"),
        (
            {"breaker": {"consecutive_failures": -1}},
            "targets[1].breaker.consecutive_failures: must be >= 0",
        ),
        ({"deployments": []}, "targets[1].deployments: must be a non-empty array"),
        (
            {"deployments": [{"base_url": "ftp://x"}]},
            "targets[1].deployments[0].base_url: must be an absolute http(s) URL",
        ),
        ({"deployments": [{"weight": 1}]}, "targets[1].deployments[0].base_url: is required"),
        (
            {"deployments": [{"base_url": "http://x/v1", "weight": 0}]},
            "targets[1].deployments[0].weight: must be a positive number",
        ),
        (
            {"deployments": [{"base_url": "http://x/v1"}, {"base_url": "http://x/v1"}]},
            "targets[1].deployments[1].name: duplicates deployment 'x'",
        ),
        (
            {"deployments": [{"target": "ghost"}]},
            "targets[1].deployments[0].target: references unknown target 'ghost'",
        ),
        (
            {"deployments": [{"target": "gpt"}]},
            "targets[1].deployments[0].target: a target cannot be its own deployment",
        ),
        (
            {"deployments": [{"target": "local", "base_url": "http://x/v1"}]},
            "targets[1].deployments[0]: a deployment is either target = ... or base_url",
        ),
        (
            {"base_url": "http://x/v1", "deployments": [{"base_url": "http://y/v1"}]},
            "targets[1].base_url: is set per deployment when deployments are listed",
        ),
    ],
)
def test_mistakes_are_reported_with_their_path(change: dict[str, Any], expected: str) -> None:
    target = {"name": "gpt", "type": "openai_compatible", "model": "m", "base_url": "http://a/v1"}
    if "deployments" in change:
        del target["base_url"]
    problems = _problems({**target, **change})
    assert any(p.startswith(expected) for p in problems), problems


def test_deployments_only_on_provider_targets_and_keys_per_deployment() -> None:
    problems = _problems(
        {"name": "l2", "type": "local", "model": "/m.gguf", "deployments": [{"target": "local"}]},
        {"name": "o", "type": "openai", "model": "m", "deployments": [{"name": "k1"}]},
    )
    assert "targets[1].deployments: is only allowed on provider targets" in problems
    assert "targets[2].deployments[0].api_key_env: is required" in problems


def test_fallback_loops_are_refused() -> None:
    a = {"name": "a", "type": "openai_compatible", "model": "m", "base_url": "http://a/v1"}
    problems = _problems(
        {**a, "fallbacks": ["b"]},
        {**a, "name": "b", "context_fallbacks": ["c"]},
        {**a, "name": "c", "fallbacks": ["a"]},
    )
    assert "targets[1].fallbacks: fallbacks loop: a -> b -> c -> a" in problems


def test_a_pool_of_pools_of_targets_is_refused() -> None:
    inner = {"name": "inner", "type": "openai_compatible", "model": "m"}
    problems = _problems(
        {**inner, "deployments": [{"target": "local"}]},
        {**inner, "name": "outer", "deployments": [{"target": "inner"}]},
    )
    assert (
        "targets[2].deployments[0].target: target 'inner' is itself a pool of targets" in problems
    )


def test_check_lists_every_problem(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    toml = (root / "config" / "local.toml").read_text() + (
        '\n[[targets]]\nname = "p"\ntype = "openai_compatible"\nmodel = "m"\n'
        'fallbacks = ["ghost"]\n[targets.retry]\nattempts = 0\n'
        '[[targets.deployments]]\nbase_url = "nope"\n'
    )
    path = tmp_path / "pool.toml"
    path.write_text(toml)
    out = subprocess.run(
        [sys.executable, "-m", "sipp.cli.gateway", "check", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    for problem in (
        "targets[1].fallbacks[0]: references unknown target 'ghost'",
        "targets[1].retry.attempts: must be greater than zero",
        "targets[1].deployments[0].base_url: must be an absolute http(s) URL",
    ):
        assert problem in out.stderr
