"""The gateway's shared state: configuration, the one client, targets and runtime controls.

`resolve_target` and `for_caller` are the two questions every stage asks of it:
which endpoint serves a public target name, and how a failure may be shown to
the caller (a provider's own message stays in the log).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._client import AsyncSippClient
from .._descriptors import EndpointRef
from .._errors import EndpointNotFoundError, ExecutionError, SippError, UnavailableError
from .activity import Activity, RequestRecord
from .auth import TokenTable
from .cache.exact import ExactCache
from .config import GatewayConfig
from .limits import ClientLimiter, ConcurrencyLimit, RateLimitSetting
from .metrics import GatewayMetrics
from .shaping import Shaper
from .upstream import caller_error, from_upstream, log_upstream
from .upstreams.pool import Pool

__all__ = ["GatewayState", "for_caller", "resolve_target"]


@dataclass
class GatewayState:
    config: GatewayConfig
    client: AsyncSippClient
    tokens: TokenTable
    targets: dict[str, EndpointRef] = field(default_factory=dict)
    target_errors: dict[str, str] = field(default_factory=dict)
    ready: bool = False
    stats_targets: set[str] = field(default_factory=set)
    # Runtime controls set from the admin API; in memory, reset on restart.
    blocked_ips: set[str] = field(default_factory=set)
    disabled_targets: set[str] = field(default_factory=set)
    admin: Any = None  # AdminState when an admin route and password are configured
    secrets: list[str] = field(default_factory=list)  # provider keys, masked in logs
    shaper: Shaper | None = None  # caller and target limits, when any is configured
    shared: Any = None  # SharedControls: the runtime controls every replica shares (Redis)
    caches: dict[str, ExactCache] = field(default_factory=dict)  # by target, when configured

    def __post_init__(self) -> None:
        self.limit = ConcurrencyLimit(self.config.max_concurrent_requests)
        security = self.config.security
        # replaced by the shared one (Redis) when `[state]` has every replica share it
        self.rate_limiter: ClientLimiter | None = RateLimitSetting.configured(security).in_memory()
        self.target_configs = {t.name: t for t in self.config.targets}
        # Every target is a pool, of its deployments or of itself alone.
        self.pools = {t.name: Pool(t.name, t.resilience) for t in self.config.targets}
        self.metrics = GatewayMetrics(self.local_stats, lambda: self.pools.values())
        self.activity = Activity()

    def record(self, operation: str) -> RequestRecord:
        """A new public request's record; its `finish` feeds /metrics and the dashboard."""
        return RequestRecord(operation, self._finished)

    def _finished(self, record: RequestRecord) -> None:
        self.metrics.observe(record)
        self.activity.record(record)

    def refused(self, reason: str) -> None:
        """Count a refusal before the request ran: `rate_limited` or `admission_rejected`."""
        counter = (
            self.metrics.rate_limited
            if reason == "rate_limited"
            else self.metrics.admission_rejected
        )
        counter.inc()
        self.activity.refused(reason)

    def target_state(self, name: str) -> str:
        """`loading`, `loaded` or `failed` (did not load, or its engine died since)."""
        if name in self.target_errors:
            return "failed"
        ref = self.targets.get(name)
        if ref is None:
            return "loading"
        return "failed" if self.target_failure(ref) is not None else "loaded"

    def target_failure(self, ref: EndpointRef) -> str | None:
        try:
            return self.client.endpoint_failure(ref)
        except SippError:  # no longer registered (the client is closing)
            return None

    def local_stats(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name in self.stats_targets:
            ref = self.targets.get(name)
            if ref is not None:
                try:
                    out[name] = self.client.runtime_metrics(ref)
                except SippError:
                    continue
        return out


def resolve_target(state: GatewayState, name: str) -> EndpointRef:
    """The endpoint serving public target `name`: 404 if unknown, 500 if it failed to load,
    503 while it is still loading (a client may retry, as /readyz says)."""
    if name in state.target_errors:
        raise ExecutionError(f"target {name!r} failed to load")
    if name in state.disabled_targets:
        raise UnavailableError(f"target {name!r} is disabled by an operator")
    ref = state.targets.get(name)
    if ref is None:
        if not state.ready and name in state.target_configs:
            raise UnavailableError(f"target {name!r} is still loading")
        raise EndpointNotFoundError(f"unknown target {name!r}")
    if state.target_failure(ref) is not None:  # the details are in the log, not for callers
        raise UnavailableError(f"target {name!r} is unavailable: its engine stopped")
    return ref


def for_caller(state: GatewayState, target: str | None, exc: SippError) -> SippError:
    """`exc` as the caller may see it; a provider's failure is logged and counted under
    its target first (see `upstream`)."""
    if from_upstream(exc):
        status = str(exc.status) if exc.status is not None else exc.code
        state.metrics.upstream_errors.labels(target or "unknown", status).inc()
        log_upstream(target, exc, state.secrets)
    return caller_error(exc)
