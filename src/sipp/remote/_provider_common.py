"""Pieces every provider adapter shares: descriptor checks, JSON, errors, headers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from .._descriptors import ProviderDescriptor
from .._endpoint import EmbedRequest, TextRequest
from .._errors import InvalidRequestError, RemoteError, SippError
from ..protocol.errors import error_from_status
from ._exchange import json_post

__all__ = ["ProviderBase", "load_json", "merge_provider_options"]


def merge_provider_options(
    body: dict[str, Any], options: Mapping[str, Any] | None, typed: Iterable[str]
) -> dict[str, Any]:
    """Provider options go into the body but never replace a typed field."""
    if not options:
        return body
    clash = sorted(set(options) & set(typed))
    if clash:
        raise InvalidRequestError(
            f"provider_options cannot override typed fields ({', '.join(clash)}); "
            "set them through SippTextOptions or the descriptor"
        )
    return {**body, **options}


def load_json(body: bytes, name: str, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except ValueError:
        snippet = body[:120].decode("utf-8", errors="replace")
        raise RemoteError(f"{name}: {what} is not JSON: {snippet!r}", retryable=False) from None
    if not isinstance(obj, dict):
        raise RemoteError(f"{name}: {what} is not a JSON object")
    return obj


class ProviderBase:
    """Descriptor handling, request building and HTTP error mapping."""

    typed_fields: frozenset[str] = frozenset()
    request_id_headers: tuple[str, ...] = ("x-request-id",)

    def __init__(self, descriptor: ProviderDescriptor) -> None:
        self.d = descriptor
        self.name = f"{descriptor.provider} ({descriptor.model})"
        assert descriptor.base_url is not None
        self.base = descriptor.base_url.rstrip("/")

    def supports_tools(self) -> bool:
        return False  # an adapter declares tools once it carries them both ways

    def auth_value(self) -> str | None:
        return self.d.api_key

    def auth_headers(self, key: str | None) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"} if key else {}

    def headers_for(self, auth_value: str | None) -> dict[str, str]:
        headers = {**self.d.static_headers, **self.auth_headers(auth_value)}
        if self.d.correlation_header:
            headers[self.d.correlation_header] = uuid.uuid4().hex
        return headers

    def check_text(self, request: TextRequest) -> None:
        self._check_common(request)

    def check_embed(self, request: EmbedRequest) -> None:
        self._check_common(request)

    def _check_common(self, request: TextRequest | EmbedRequest) -> None:
        if request.local is not None:
            raise InvalidRequestError(
                f"local options are not accepted by provider endpoints ({self.name})"
            )
        if request.endpoint_options:
            raise InvalidRequestError(
                "endpoint_options are for gateway endpoints; use provider_options"
            )
        reject_images(request, f"provider endpoints ({self.name})")
        merge_provider_options({}, request.provider_options, self.typed_fields)

    def post(
        self, path: str, body: dict[str, Any], headers: dict[str, str], stream: bool
    ) -> httpx.Request:
        return json_post(self.base + path, body, headers, stream)

    def error(self, status: int, headers: httpx.Headers, body: bytes) -> SippError:
        request_id = next((headers[h] for h in self.request_id_headers if h in headers), None)
        if request_id is None and self.d.correlation_header:
            request_id = headers.get(self.d.correlation_header)
        message = (
            self.provider_message(body) or body[:200].decode("utf-8", errors="replace") or "no body"
        )
        error = error_from_status(
            status, f"{self.d.provider} HTTP {status}: {message}", request_id=request_id
        )
        error.retry_after = _retry_after(headers.get("retry-after"))
        return error

    @staticmethod
    def provider_message(body: bytes) -> str | None:
        """`{"error": {"message": ...}}` — the shape both OpenAI and Anthropic use."""
        try:
            error = json.loads(body)["error"]
            return str(error["message"]) if isinstance(error, dict) else str(error)
        except (ValueError, KeyError, TypeError):
            return None


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds; the HTTP-date form is ignored (providers send seconds)."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < 86_400 else None


def reject_images(request: TextRequest | EmbedRequest, where: str) -> None:
    """Images ride on chat messages; only a local endpoint with a projector reads them."""
    messages = request.messages if isinstance(request, TextRequest) else None
    if messages and any(m.images for m in messages):
        raise InvalidRequestError(
            f"chat message images are local-only and not accepted by {where}", field="images"
        )
