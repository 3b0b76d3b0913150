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
import re
from collections.abc import Iterable

from .._errors import (
    ContextOverflowError,
    OverloadedError,
    RateLimitedError,
    RemoteError,
    SippError,
    UnavailableError,
)

__all__ = ["HEALTH_FAILURES", "caller_error", "failure_kind", "from_upstream", "log_upstream"]

logger = logging.getLogger("sipp.gateway.upstream")
# How OpenAI-style, Anthropic, vLLM and llama-server word a prompt over the context.
_CONTEXT = re.compile(
    r"context[_ ]length|context window|maximum context|prompt is too long|exceeds the context",
    re.I,
)
# Failed attempts that count against a deployment's health (its circuit breaker).
HEALTH_FAILURES = frozenset({"connect", "timeout", "429", "5xx"})


def failure_kind(exc: SippError) -> str:
    """How the execute stage treats a failed attempt: `connect`, `timeout`, `429` and
    `5xx` may be retried and fall back; `context` goes to the context fallbacks;
    `unavailable` (a target switched off or stopped) moves on without retrying it;
    `4xx` and `error` are the request's own fault and final."""
    if isinstance(exc, ContextOverflowError) or (
        exc.status == 400 and _CONTEXT.search(exc.message)
    ):
        return "context"
    if exc.status == 429 or isinstance(exc, (OverloadedError, RateLimitedError)):
        return "429"
    if exc.code == "timeout":
        return "timeout"
    if exc.status is not None:
        return "5xx" if exc.status >= 500 else "4xx"
    if isinstance(exc, RemoteError):
        return "connect" if exc.retryable else "error"
    if isinstance(exc, UnavailableError) or exc.code in ("model_load", "backend_unavailable"):
        return "unavailable"
    if exc.code == "execution":  # a local engine failed while running
        return "5xx"
    return "4xx" if exc.code in ("invalid_request", "unsupported_operation") else "error"


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
