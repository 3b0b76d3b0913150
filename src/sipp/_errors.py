"""The `SippError` tree.

Every error carries a stable `code`: the same string the gateway puts in the
wire envelope `{"error": {"code", "message"}}`, so callers can branch on it
without parsing messages. Codes never change once released; messages may.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "AuthorizationError",
    "BackendUnavailableError",
    "ClientClosedError",
    "ContextOverflowError",
    "EndpointNotFoundError",
    "ExecutionError",
    "InvalidConfigError",
    "InvalidRequestError",
    "ModelLoadError",
    "OverloadedError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "RemoteError",
    "SippError",
    "UnavailableError",
    "UnsupportedOperationError",
]


class SippError(Exception):
    """Base class of every error Sipp raises on purpose."""

    code: str = "execution"
    retryable: bool = False  # True when the same request may succeed later (429, 5xx, timeouts)
    retry_after: float | None = None  # seconds, from a 429's Retry-After when one was given

    def __init__(
        self, message: str, *, status: int | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        # Set when the error came over HTTP: the response status and its request id.
        self.status = status
        self.request_id = request_id
        # Set when a stream failed after some text arrived: the text received so far.
        self.partial_text: str | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class InvalidRequestError(SippError):
    """A request argument is malformed or out of range (HTTP 400). `field` names the
    request field at fault when there is one (OpenAI's envelope calls it `param`)."""

    code = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, status=status, request_id=request_id)
        self.field = field


class InvalidConfigError(SippError):
    """A descriptor or runtime config field is invalid or not supported by this runtime."""

    code = "invalid_config"


class UnsupportedOperationError(SippError):
    """The endpoint cannot run this operation (e.g. `chat` on a model without a template)."""

    code = "unsupported_operation"


class EndpointNotFoundError(SippError):
    """No registered endpoint matches the request (HTTP 404 on the gateway)."""

    code = "not_found"


class ModelLoadError(SippError):
    """The model file is missing, not GGUF, truncated, or llama.cpp refused it."""

    code = "model_load"


class BackendUnavailableError(SippError):
    """The requested compute backend is not in the installed llama.cpp build."""

    code = "backend_unavailable"


class ContextOverflowError(SippError):
    """Prompt plus requested output do not fit the context window."""

    code = "context_overflow"


class OverloadedError(SippError):
    """The endpoint's queue is full (HTTP 429 on the gateway)."""

    code = "overloaded"
    retryable = True


class ClientClosedError(SippError):
    """The client (or endpoint) was closed before or during the call."""

    code = "client_closed"


class ExecutionError(SippError):
    """Inference failed while running (HTTP 500 on the gateway)."""

    code = "execution"


class AuthenticationError(SippError):
    """Missing or malformed credentials (HTTP 401)."""

    code = "authentication"


class AuthorizationError(SippError):
    """Valid credentials that may not use this target (HTTP 403)."""

    code = "authorization"


class PayloadTooLargeError(SippError):
    """The request body exceeds the server's limit (HTTP 413)."""

    code = "payload_too_large"


class RateLimitedError(SippError):
    """The caller's rate limit is exhausted (HTTP 429)."""

    code = "rate_limited"
    retryable = True


class RemoteError(SippError):
    """A remote service failed in a way no other class describes (bad gateway,
    broken stream, unparseable body, network failure). `retryable` tells a
    transient failure (5xx, timeouts, resets) from a permanent one."""

    code = "upstream"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
        retryable: bool = False,
        code: str | None = None,
    ) -> None:
        super().__init__(message, status=status, request_id=request_id)
        self.retryable = retryable
        if code is not None:
            self.code = code


class UnavailableError(SippError):
    """The target exists but is switched off for now (HTTP 503), e.g. by an operator."""

    code = "unavailable"
    retryable = True
