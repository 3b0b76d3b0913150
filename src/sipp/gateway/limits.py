"""Admission control: the process-wide concurrency limit and per-client token buckets
(in this process's memory, or in the state store every replica shares)."""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from .._errors import InvalidRequestError, OverloadedError, RateLimitedError
from .config import SecurityConfig
from .shaping import store_unavailable
from .store import Bucket, Store, StoreUnavailable

if TYPE_CHECKING:
    from .metrics import GatewayMetrics

__all__ = [
    "ClientLimiter",
    "ConcurrencyLimit",
    "RateLimitSetting",
    "RateLimiter",
    "SharedRateLimiter",
    "client_ip",
    "served_over_tls",
]


class ConcurrencyLimit:
    """At most `limit` requests in flight; one more is refused at once (never queued)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.in_flight = 0

    def acquire(self) -> None:
        if self.limit is not None and self.in_flight >= self.limit:
            raise OverloadedError("max_concurrent_requests is full; retry later")
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


class RateLimiter:
    """Token bucket per client key: `burst` capacity, refilled at `per_minute / 60` per second.

    Buckets live in memory (lost on restart) and the least recently seen ones are
    dropped past `max_clients`, so a flood of source addresses cannot exhaust memory."""

    def __init__(self, per_minute: int, burst: int, *, max_clients: int = 100_000) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, key: str, now: float | None = None, *, cost: int = 1) -> None:
        """Take `cost` tokens from `key`'s bucket, all or none (429 when it cannot cover them)."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            error = RateLimitedError("rate limit exceeded for this client; retry later")
            error.retry_after = math.ceil((cost - tokens) / self.rate)
            raise error
        self._buckets[key] = (tokens - cost, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)


class RateLimitSetting(NamedTuple):
    """The per-client limit as `[security.rate_limit]` or the admin API sets it."""

    enabled: bool
    requests_per_minute: int
    burst: int

    @classmethod
    def configured(cls, security: SecurityConfig) -> RateLimitSetting:
        return cls(security.rate_limit_enabled, security.requests_per_minute, security.burst)

    @classmethod
    def parse(cls, value: Mapping[str, Any]) -> RateLimitSetting:
        """The setting an admin request (or the shared override) gives; the rate and
        burst default to 60, as in the TOML."""
        enabled, rpm, burst = (
            value.get("enabled"),
            value.get("requests_per_minute", 60),
            value.get("burst", 60),
        )
        if not isinstance(enabled, bool) or not all(type(n) is int and n > 0 for n in (rpm, burst)):
            raise InvalidRequestError(
                "need enabled (bool), requests_per_minute and burst (positive integers)"
            )
        return cls(enabled, rpm, burst)

    def in_memory(self) -> RateLimiter | None:
        return RateLimiter(self.requests_per_minute, self.burst) if self.enabled else None


class SharedRateLimiter:
    """`RateLimiter`'s buckets in the state store (Redis), so one client's requests count
    the same whichever replica takes them. A bucket holds `burst` and refills it every
    `burst * 60 / per_minute` seconds, which is `per_minute` a minute; its key is the
    client's address under `{prefix}:client_ip:`. Redis unreachable: `on_unavailable`
    decides, as it does for the token limits."""

    def __init__(
        self,
        store: Store,
        prefix: str,
        per_minute: int,
        burst: int,
        *,
        fail_closed: bool,
        metrics: GatewayMetrics,
    ) -> None:
        self.store, self.prefix, self.metrics = store, prefix, metrics
        self.per_minute, self.burst = per_minute, float(burst)
        self.rate = per_minute / 60.0
        self.fail_closed = fail_closed
        self._period_ms = max(1, round(burst * 60_000 / per_minute))

    async def available(self) -> bool:
        """Whether the state store answers now (the readiness route asks)."""
        up = await self.store.ping()
        self.metrics.state_available.set(int(up))
        return up

    async def take(self, key: str, cost: int = 1) -> None:
        """Take `cost` tokens from `key`'s shared bucket, all or none (429 when it cannot
        cover them; 503 when the store is away and the policy fails closed)."""
        bucket = Bucket(f"{self.prefix}:client_ip:{key}", int(self.burst), self._period_ms)
        try:
            grant = await self.store.reserve([bucket], [cost])
        except StoreUnavailable:
            store_unavailable(self.metrics, self.fail_closed)
            return
        self.metrics.state_available.set(1)
        if not grant.ok:
            error = RateLimitedError("rate limit exceeded for this client; retry later")
            if grant.retry_after is not None:
                error.retry_after = max(1, math.ceil(grant.retry_after))
            raise error


ClientLimiter = RateLimiter | SharedRateLimiter


def client_ip(peer: str | None, headers: Mapping[str, str], security: SecurityConfig) -> str:
    """The client address per `security.client_ip`: forwarded headers count only
    when the TCP peer is inside `trusted_proxy_cidrs`."""
    peer = peer or "unknown"
    if security.client_ip_source == "peer" or not _trusted(peer, security):
        return peer
    if security.client_ip_source == "x_real_ip":
        candidate = headers.get("x-real-ip", "").strip()
    else:
        # The right-most address not added by one of our trusted proxies is the client.
        hops = [h.strip() for h in headers.get("x-forwarded-for", "").split(",") if h.strip()]
        candidate = ""
        for hop in reversed(hops):
            candidate = hop
            if not _trusted(hop, security):
                break
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return peer


def served_over_tls(
    scheme: str, peer: str | None, headers: Mapping[str, str], security: SecurityConfig
) -> bool:
    """True for https, or when a trusted proxy says (X-Forwarded-Proto) it ended TLS."""
    if scheme == "https":
        return True
    forwarded = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return forwarded == "https" and peer is not None and _trusted(peer, security)


def _trusted(address: str, security: SecurityConfig) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in security.trusted_proxy_cidrs)
