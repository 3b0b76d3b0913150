"""One target's deployments and how a request picks among the healthy ones."""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace

from ..._descriptors import EndpointRef
from .breaker import Breaker
from .policy import Deployment, Resilience

__all__ = ["DeploymentState", "Pool"]

_EWMA_WEIGHT = 0.2  # each new sample's share of the latency estimate


@dataclass
class DeploymentState:
    """A deployment's live figures: requests in flight, latency estimate and breaker."""

    spec: Deployment
    breaker: Breaker
    ref: EndpointRef | None = None  # its own endpoint when it has a base URL
    in_flight: int = 0
    latency: float | None = None  # EWMA of seconds to the first token (or the response)

    @property
    def name(self) -> str:
        return self.spec.name

    def observe_latency(self, seconds: float) -> None:
        if self.latency is None:
            self.latency = seconds
        else:
            self.latency += _EWMA_WEIGHT * (seconds - self.latency)


class Pool:
    """A target's deployments (the target itself when it lists none)."""

    def __init__(self, name: str, resilience: Resilience, rng: random.Random | None = None) -> None:
        self.name = name
        self.resilience = resilience
        self.configured = resilience  # as the TOML says, before any edit of the fallbacks
        self._rng = rng or random.Random()
        specs = resilience.deployments or (Deployment(name),)
        self.deployments = [DeploymentState(d, Breaker(resilience.breaker)) for d in specs]
        self.implicit = not resilience.deployments

    def set_fallbacks(self, fallbacks: Sequence[str], context_fallbacks: Sequence[str]) -> None:
        """Replace the fallback lists; the next failure of any request reads the new ones
        (the settings are one immutable value, swapped at once)."""
        self.resilience = replace(
            self.resilience,
            fallbacks=tuple(fallbacks),
            context_fallbacks=tuple(context_fallbacks),
        )

    def pick(self, avoid: Collection[str] = ()) -> DeploymentState:
        """A deployment for the next attempt: among those whose breaker lets it through,
        preferring ones this request has not tried (`avoid`); when every breaker is open,
        among all of them, so a pool never refuses on its own."""
        deps = self.deployments
        if len(deps) == 1:
            return deps[0]
        healthy = [d for d in deps if d.breaker.available()] or deps
        fresh = [d for d in healthy if d.name not in avoid] or healthy
        return self._choose(fresh)

    def _choose(self, candidates: list[DeploymentState]) -> DeploymentState:
        if len(candidates) == 1:
            return candidates[0]
        strategy = self.resilience.strategy
        if strategy == "weighted":
            return self._rng.choices(candidates, [d.spec.weight for d in candidates])[0]
        if strategy == "latency":
            # An unmeasured deployment goes first, so each one gets an estimate.
            return min(candidates, key=_latency_key(self._rng))
        a, b = self._rng.sample(candidates, 2)  # power of two random choices
        return a if a.in_flight <= b.in_flight else b


def _latency_key(rng: random.Random) -> Callable[[DeploymentState], tuple[float, float]]:
    def key(d: DeploymentState) -> tuple[float, float]:
        return (-1.0 if d.latency is None else d.latency, rng.random())

    return key
