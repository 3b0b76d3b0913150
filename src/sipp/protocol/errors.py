"""The wire error envelope `{"error": {"code", "message"}}` and the status table."""

from __future__ import annotations

import json
import re
from typing import Any

from .._errors import (
    AuthenticationError,
    AuthorizationError,
    BackendUnavailableError,
    ClientClosedError,
    ContextOverflowError,
    EndpointNotFoundError,
    ExecutionError,
    InvalidConfigError,
    InvalidRequestError,
    ModelLoadError,
    OverloadedError,
    PayloadTooLargeError,
    RateLimitedError,
    RemoteError,
    SippError,
    UnavailableError,
    UnsupportedOperationError,
)

__all__ = [
    "STATUS_BY_CODE",
    "encodable",
    "error_body",
    "error_from_body",
    "error_from_status",
    "status_for",
]

_CLASSES: tuple[type[SippError], ...] = (
    InvalidRequestError,
    UnsupportedOperationError,
    ContextOverflowError,
    AuthenticationError,
    AuthorizationError,
    EndpointNotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    OverloadedError,
    ExecutionError,
    ModelLoadError,
    InvalidConfigError,
    BackendUnavailableError,
    ClientClosedError,
    RemoteError,
    UnavailableError,
)
_CLASS_BY_CODE = {cls.code: cls for cls in _CLASSES}

STATUS_BY_CODE: dict[str, int] = {
    "invalid_request": 400,
    "unsupported_operation": 400,
    "context_overflow": 400,
    "authentication": 401,
    "authorization": 403,
    "not_found": 404,
    "payload_too_large": 413,
    "rate_limited": 429,
    "overloaded": 429,
    "execution": 500,
    "model_load": 500,
    "invalid_config": 500,
    "backend_unavailable": 500,
    "upstream": 502,
    "timeout": 504,
    "client_closed": 503,
    "unavailable": 503,
}
_CODE_BY_STATUS = {
    400: "invalid_request",
    401: "authentication",
    403: "authorization",
    404: "not_found",
    413: "payload_too_large",
    429: "rate_limited",
}


def status_for(error: SippError) -> int:
    return STATUS_BY_CODE.get(error.code, 500)


# json.loads joins an escaped pair into one character, so a surrogate left in a str is a
# lone one (`"\udfff"`): no UTF-8 encoder can write it.
_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(value: Any) -> Any:
    """`value` (strings, and dicts and lists of them, keys too) with every lone surrogate
    replaced by U+FFFD. An error echoes what the client sent (a field's name, say), and
    a body that cannot be encoded as UTF-8 would turn a 400 into a failed response."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {encodable(k): encodable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [encodable(v) for v in value]
    return value


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": encodable(message)}}


def error_from_status(
    status: int, message: str, *, code: str | None = None, request_id: str | None = None
) -> SippError:
    """The typed error for an HTTP failure: by wire `code` when known, else by status.

    A 5xx without a Sipp envelope (a proxy's HTML page, a crashed upstream) is a
    retryable `RemoteError`, distinct from a target's own `execution` error."""
    code = code or _CODE_BY_STATUS.get(status) or "upstream"
    cls = _CLASS_BY_CODE.get(code)
    retryable = status >= 500 or status == 429
    if cls is None or cls is RemoteError:
        return RemoteError(
            message,
            status=status,
            request_id=request_id,
            retryable=retryable,
            code=code if cls is None else None,
        )
    return cls(message, status=status, request_id=request_id)


def error_from_body(status: int, body: bytes, *, request_id: str | None = None) -> SippError:
    """Parse a Sipp error envelope; a body that is not one still gives a typed error."""
    try:
        parsed = json.loads(body)
        inner = parsed["error"]
        code, message = str(inner["code"]), str(inner["message"])
    except (ValueError, KeyError, TypeError):
        snippet = body[:200].decode("utf-8", errors="replace")
        return error_from_status(
            status, f"HTTP {status} with a non-envelope body: {snippet!r}", request_id=request_id
        )
    return error_from_status(status, message, code=code, request_id=request_id)
