"""Endpoint descriptors (what to register) and `EndpointRef` (what `add` returns)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias
from urllib.parse import urlsplit

from ._errors import InvalidConfigError
from ._runtime_config import NativeRuntimeConfig

__all__ = [
    "AuthenticationKind",
    "EndpointDescriptor",
    "EndpointKind",
    "EndpointRef",
    "GatewayDescriptor",
    "GatewayTimeoutPolicy",
    "LocalModelDescriptor",
    "ProviderDescriptor",
    "ProviderName",
]

EndpointKind = Literal["local", "gateway", "provider"]


@dataclass(frozen=True)
class EndpointRef:
    """A lightweight handle naming a registered endpoint: `(kind, id)`."""

    kind: EndpointKind
    id: str


@dataclass(frozen=True)
class LocalModelDescriptor:
    """A GGUF model run inside this process: `LocalModelDescriptor("model.gguf", config)`."""

    model_path: str | os.PathLike[str]
    config: NativeRuntimeConfig = field(default_factory=NativeRuntimeConfig)
    kind: Literal["local"] = field(default="local", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model_path, (str, os.PathLike)) or str(self.model_path) == "":
            raise InvalidConfigError("LocalModelDescriptor needs a model path")
        if self.config is None:
            object.__setattr__(self, "config", NativeRuntimeConfig())
        elif not isinstance(self.config, NativeRuntimeConfig):
            raise InvalidConfigError(
                "LocalModelDescriptor.config must be a NativeRuntimeConfig, "
                f"got {type(self.config).__name__}"
            )

    @property
    def path(self) -> Path:
        return Path(os.fspath(self.model_path))


AuthenticationKind = Literal["none", "bearer", "header"]
ValueProvider = Callable[[], "str | Awaitable[str]"]


@dataclass(frozen=True, kw_only=True)
class GatewayTimeoutPolicy:
    """Deadlines in seconds, the same in the sync and async shells.

    `connect_s`: TCP (and TLS) connect. `request_s`: the whole request, from sending
    it to the last byte of a finite body, or to the first token of a stream.
    `stream_read_s`: once a stream has sent its first token, the longest wait for
    each next SSE frame (a frame trickled byte by byte still counts as one wait).
    Past any of them the run fails with `RemoteError` code "timeout"."""

    connect_s: float = 10.0
    request_s: float = 300.0
    stream_read_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("connect_s", "request_s", "stream_read_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidConfigError(
                    f"GatewayTimeoutPolicy.{name} must be a positive number of seconds"
                )


@dataclass(frozen=True)
class GatewayDescriptor:
    """A remote Sipp gateway: `GatewayDescriptor(target, base_url, authentication_kind="bearer",
    authentication_value=token)`.

    `authentication_value_provider` (a callable returning the value, async allowed with
    `AsyncSippClient`) is called for every request, for short-lived tokens.
    `protocol_options` are merged into every request body; they cannot replace the
    typed fields (model, prompt, messages, input, max_tokens, temperature, top_p, stop, stream).
    """

    target: str
    base_url: str
    authentication_kind: AuthenticationKind = "none"
    authentication_value: str | None = field(default=None, repr=False)
    authentication_header_name: str | None = None
    authentication_value_provider: ValueProvider | None = field(default=None, repr=False)
    static_headers: Mapping[str, str] = field(default_factory=dict)
    timeout: GatewayTimeoutPolicy = field(default_factory=GatewayTimeoutPolicy)
    query_route: str = "/v1/query"
    chat_route: str = "/v1/chat"
    embed_route: str = "/v1/embed"
    protocol_options: Mapping[str, Any] = field(default_factory=dict)
    kind: Literal["gateway"] = field(default="gateway", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target:
            raise InvalidConfigError(
                "GatewayDescriptor.target must be the gateway's public target name"
            )
        _check_base_url(self.base_url, "GatewayDescriptor.base_url")
        if self.authentication_kind not in ("none", "bearer", "header"):
            raise InvalidConfigError(
                "GatewayDescriptor.authentication_kind must be none, bearer or header"
            )
        has_value = (
            self.authentication_value is not None or self.authentication_value_provider is not None
        )
        if self.authentication_kind != "none" and not has_value:
            raise InvalidConfigError(
                f"authentication_kind={self.authentication_kind!r} needs authentication_value "
                "or authentication_value_provider"
            )
        if self.authentication_kind == "header" and not _is_token(self.authentication_header_name):
            raise InvalidConfigError(
                "authentication_kind='header' needs a valid authentication_header_name"
            )
        _check_headers(self.static_headers)
        for route_name in ("query_route", "chat_route", "embed_route"):
            route = getattr(self, route_name)
            if (
                not isinstance(route, str)
                or not route.startswith("/")
                or "?" in route
                or "#" in route
            ):
                raise InvalidConfigError(
                    f"GatewayDescriptor.{route_name} must be an absolute path, got {route!r}"
                )
        if not isinstance(self.timeout, GatewayTimeoutPolicy):
            raise InvalidConfigError("GatewayDescriptor.timeout must be a GatewayTimeoutPolicy")

    def auth_value(self) -> str | Awaitable[str] | None:
        if self.authentication_kind == "none":
            return None
        if self.authentication_value_provider is not None:
            return self.authentication_value_provider()
        return self.authentication_value

    def auth_headers(self, value: str | None) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, str) or not value or any(c in value for c in "\r\n"):
            raise InvalidConfigError(
                "the gateway authentication value must be a non-empty single-line string"
            )
        if self.authentication_kind == "bearer":
            return {"authorization": f"Bearer {value}"}
        assert self.authentication_header_name is not None
        return {self.authentication_header_name: value}


def _check_base_url(url: object, where: str) -> None:
    parsed = urlsplit(url if isinstance(url, str) else "")
    if (
        parsed.scheme not in ("http", "https")
        or not parsed.netloc
        or parsed.query
        or parsed.fragment
    ):
        raise InvalidConfigError(
            f"{where} must be an absolute http(s) URL without query or fragment, got {url!r}"
        )


def _check_headers(headers: Mapping[str, str]) -> None:
    for name, value in dict(headers).items():
        if not _is_token(name) or not isinstance(value, str) or "\n" in value or "\r" in value:
            raise InvalidConfigError(f"static header {name!r} is not a valid HTTP header")


def _is_token(name: object) -> bool:
    return (
        isinstance(name, str)
        and bool(name)
        and all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in name)
    )


ProviderName = Literal["openai", "anthropic", "openai_compatible"]
_DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com/v1",
}


@dataclass(frozen=True)
class ProviderDescriptor:
    """A model provider called directly: `ProviderDescriptor("openai", "gpt-4o-mini", api_key=...)`.

    `base_url` defaults to the provider's public API (required for `openai_compatible`).
    `correlation_header` names a header that carries a fresh id on every request (and is
    read back as the error's `request_id` when the server echoes it). Use provider
    endpoints only in trusted server code: the key lives in this process.
    """

    provider: ProviderName
    model: str
    api_key: str | None = field(default=None, repr=False)
    base_url: str | None = None
    correlation_header: str | None = None
    static_headers: Mapping[str, str] = field(default_factory=dict)
    timeout: GatewayTimeoutPolicy = field(default_factory=GatewayTimeoutPolicy)
    anthropic_version: str = "2023-06-01"
    kind: Literal["provider"] = field(default="provider", init=False)

    def __post_init__(self) -> None:
        if self.provider not in ("openai", "anthropic", "openai_compatible"):
            raise InvalidConfigError(
                "ProviderDescriptor.provider must be openai, anthropic or openai_compatible"
            )
        if not isinstance(self.model, str) or not self.model:
            raise InvalidConfigError("ProviderDescriptor.model must be the provider's model id")
        if self.base_url is None:
            if self.provider == "openai_compatible":
                raise InvalidConfigError("provider 'openai_compatible' needs base_url")
            object.__setattr__(self, "base_url", _DEFAULT_BASE_URLS[self.provider])
        _check_base_url(self.base_url, "ProviderDescriptor.base_url")
        if self.provider != "openai_compatible" and not self.api_key:
            raise InvalidConfigError(f"provider {self.provider!r} needs api_key")
        if self.api_key is not None and (
            not isinstance(self.api_key, str) or any(c in self.api_key for c in "\r\n")
        ):
            raise InvalidConfigError("ProviderDescriptor.api_key must be a single-line string")
        if self.correlation_header is not None and not _is_token(self.correlation_header):
            raise InvalidConfigError(
                "ProviderDescriptor.correlation_header is not a valid header name"
            )
        _check_headers(self.static_headers)
        if not isinstance(self.timeout, GatewayTimeoutPolicy):
            raise InvalidConfigError("ProviderDescriptor.timeout must be a GatewayTimeoutPolicy")


EndpointDescriptor: TypeAlias = LocalModelDescriptor | GatewayDescriptor | ProviderDescriptor
