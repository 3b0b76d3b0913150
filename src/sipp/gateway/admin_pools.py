"""The admin API's pools: each target's deployments as they are now (health, breaker,
in flight, latency, error rate) and its fallback rules, which an operator may edit.

An edit is checked like the TOML (`sipp-gateway check`'s rules) and applies to the
next failure of any request. It lives in this process and resets on restart, unless
`[state] backend = "redis"`: then it is stored there and every replica follows it.
Only names are shown: never a base URL (it may carry credentials) nor a key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._errors import InvalidRequestError
from .state import GatewayState
from .upstreams.fallback_rules import rule_problems
from .upstreams.pool import DeploymentState, Pool

__all__ = ["edit_fallbacks", "pools_view"]

_KEYS = ("fallbacks", "context_fallbacks")


def pools_view(state: GatewayState) -> dict[str, Any]:
    return {"pools": [_pool(state, pool) for pool in state.pools.values()]}


def _pool(state: GatewayState, pool: Pool) -> dict[str, Any]:
    res, configured = pool.resilience, pool.configured
    return {
        "target": pool.name,
        "strategy": res.strategy,
        "fallbacks": list(res.fallbacks),
        "context_fallbacks": list(res.context_fallbacks),
        "configured": {
            "fallbacks": list(configured.fallbacks),
            "context_fallbacks": list(configured.context_fallbacks),
        },
        "edited": (res.fallbacks, res.context_fallbacks)
        != (configured.fallbacks, configured.context_fallbacks),
        "deployments": [_deployment(state, pool, dep) for dep in pool.deployments],
    }


def _deployment(state: GatewayState, pool: Pool, dep: DeploymentState) -> dict[str, Any]:
    served_by = dep.spec.target or pool.name  # the target whose endpoint it runs on
    breaker = dep.breaker.state
    usable = state.target_state(served_by) == "loaded" and served_by not in state.disabled_targets
    rate = dep.breaker.error_rate()
    return {
        "name": dep.name,
        "target": dep.spec.target,
        "healthy": usable and breaker == "closed",
        "breaker": breaker,
        "breaker_opened": dep.breaker.opened,
        "in_flight": dep.in_flight,
        "latency_ms": None if dep.latency is None else round(dep.latency * 1000, 1),
        "error_rate": None if rate is None else round(rate, 3),
    }


async def edit_fallbacks(state: GatewayState, body: dict[str, Any]) -> dict[str, Any]:
    """Apply an edit (`target`, then `fallbacks` and/or `context_fallbacks`, or
    `reset: true` for the TOML's lists); what the audit records of it."""
    name = body.get("target")
    if not isinstance(name, str) or name not in state.pools:
        raise InvalidRequestError("'target' must name a configured target")
    unknown = set(body) - {"target", "reset", *_KEYS}
    if unknown:
        raise InvalidRequestError(f"unknown field(s): {', '.join(sorted(unknown))}")
    pool = state.pools[name]
    reset = body.get("reset", False)
    if not isinstance(reset, bool):
        raise InvalidRequestError("'reset' must be a boolean")
    if reset:
        if any(key in body for key in _KEYS):
            raise InvalidRequestError("'reset' takes no lists")
        rule = (pool.configured.fallbacks, pool.configured.context_fallbacks)
    else:
        if not any(key in body for key in _KEYS):
            raise InvalidRequestError("give 'fallbacks', 'context_fallbacks' or 'reset'")
        rule = (
            _names(body, "fallbacks", pool.resilience.fallbacks),
            _names(body, "context_fallbacks", pool.resilience.context_fallbacks),
        )
    problems = rule_problems(state.pools, {name: rule})
    if problems:
        raise InvalidRequestError("; ".join(problems))
    if state.shared is not None:  # every replica's, through Redis
        await state.shared.set_fallbacks(name, None if reset else rule)
    else:
        pool.set_fallbacks(*rule)
    detail: dict[str, Any] = {"target": name}
    if reset:
        detail["reset"] = True
    detail["fallbacks"] = ",".join(rule[0]) or "-"
    detail["context_fallbacks"] = ",".join(rule[1]) or "-"
    return detail


def _names(body: dict[str, Any], key: str, current: Sequence[str]) -> tuple[str, ...]:
    """The list under `key` (its current value when absent): target names, each once."""
    if key not in body:
        return tuple(current)
    value = body[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidRequestError(f"'{key}' must be an array of target names")
    if len(set(value)) != len(value):
        raise InvalidRequestError(f"'{key}' names a target twice")
    return tuple(value)
