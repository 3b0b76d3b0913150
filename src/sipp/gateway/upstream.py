"""How a provider target's failures reach the gateway's callers.

A provider's 401/403 (an expired or revoked key), 400 (a config the provider
rejects) or 5xx is the operator's problem, not the caller's: the caller gets
502 `upstream` with a generic message, while the provider's status and
message go to the log and `sipp_gateway_upstream_errors_total{target,status}`.
An upstream 429 stays 429 (`rate_limited`, with the provider's `Retry-After`),
and an upstream timeout stays 504 `timeout`, because the caller can act on both.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from .._errors import RateLimitedError, RemoteError, SippError

__all__ = ["caller_error", "from_upstream", "log_upstream"]

logger = logging.getLogger("sipp.gateway.upstream")


def from_upstream(exc: SippError) -> bool:
    """True for an error a provider answered with (it carries the HTTP status) or a failed
    exchange with one (`RemoteError`); the gateway's own refusals carry neither."""
    return exc.status is not None or isinstance(exc, RemoteError)


def caller_error(exc: SippError) -> SippError:
    """What the caller sees for `exc` (itself unless it came from upstream)."""
    if not from_upstream(exc):
        return exc
    if exc.status == 429:
        limited = RateLimitedError("the target's provider is rate limiting; retry later")
        limited.retry_after = exc.retry_after
        return limited
    if exc.code == "timeout":
        return RemoteError("the target's provider timed out", retryable=True, code="timeout")
    return RemoteError(
        "the target's provider failed; the gateway log has the details", retryable=exc.retryable
    )


def log_upstream(target: str | None, exc: SippError, secrets: Iterable[str]) -> None:
    """Log a provider failure under its target, with any configured secret masked
    (providers sometimes echo part of a rejected key)."""
    message = exc.message
    for secret in secrets:
        message = message.replace(secret, "[redacted]")
    logger.warning(
        "target %s: upstream failure (status %s, code %s): %s",
        target or "?",
        exc.status if exc.status is not None else "none",
        exc.code,
        message,
    )
