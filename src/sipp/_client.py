"""`SippClient` and `AsyncSippClient` over one I/O-free endpoint registry.

The registry only maps ids to endpoints and validates calls; endpoints do the
work on their own threads. The sync client blocks only in `add` (model load)
and in the run handles; the async client moves `add`/`close` to a worker
thread and returns awaitable runs, so neither blocks an event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._channel import RunChannel
from ._descriptors import (
    EndpointDescriptor,
    EndpointRef,
    GatewayDescriptor,
    LocalModelDescriptor,
    ProviderDescriptor,
)
from ._endpoint import EmbedRequest, Endpoint, Operation, TextRequest
from ._errors import (
    ClientClosedError,
    EndpointNotFoundError,
    InvalidConfigError,
    InvalidRequestError,
    UnsupportedOperationError,
)
from ._runs import AsyncEmbeddingRun, AsyncTextRun, EmbeddingRun, TextRun
from ._types import (
    ChatMessage,
    LocalEmbedOptions,
    LocalTextOptions,
    MessageLike,
    SippEmbeddingResponse,
    SippTextOptions,
    SippTextResponse,
)

__all__ = ["AsyncSippClient", "SippClient"]

_live_registries: weakref.WeakSet[_Registry] = weakref.WeakSet()


@atexit.register
def _close_leftovers() -> None:
    # Free native models before interpreter teardown unloads the libraries.
    for registry in list(_live_registries):
        registry.close()


def _build_endpoint(descriptor: EndpointDescriptor, id: str) -> Endpoint:
    # Imports are lazy: a gateway or provider user never loads llama.cpp, and a
    # local-only user never needs httpx.
    if isinstance(descriptor, LocalModelDescriptor):
        from .local.endpoint import LocalEndpoint

        return LocalEndpoint(descriptor, id)
    if isinstance(descriptor, GatewayDescriptor):
        from .remote.gateway import gateway_endpoint

        return gateway_endpoint(descriptor)
    if isinstance(descriptor, ProviderDescriptor):
        if descriptor.provider == "anthropic":
            from .remote.anthropic import anthropic_endpoint

            return anthropic_endpoint(descriptor)
        from .remote.openai import openai_endpoint

        return openai_endpoint(descriptor)
    raise InvalidConfigError(
        f"unsupported endpoint descriptor {type(descriptor).__name__}; "
        "expected LocalModelDescriptor, GatewayDescriptor or ProviderDescriptor"
    )


def _uses_tools(request: TextRequest) -> bool:
    if request.options.tools:
        return True
    return any(m.tool_calls or m.role == "tool" for m in request.messages or ())


class _Registry:
    """Endpoints by id, request validation, and call routing. No I/O of its own."""

    def __init__(self) -> None:
        self._endpoints: dict[str, Endpoint] = {}
        self._lock = threading.Lock()
        self._closed = False
        _live_registries.add(self)

    def check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("this SippClient is closed")

    def install(self, id: str, endpoint: Endpoint) -> tuple[EndpointRef, Endpoint | None]:
        with self._lock:
            if self._closed:
                endpoint.close()
                raise ClientClosedError("this SippClient is closed")
            old = self._endpoints.get(id)
            self._endpoints[id] = endpoint
        return EndpointRef(endpoint.kind, id), old

    def resolve(self, ref: EndpointRef | None, operation: Operation) -> Endpoint:
        self.check_open()
        with self._lock:
            if ref is not None:
                if not isinstance(ref, EndpointRef):
                    raise InvalidRequestError(
                        f"endpoint must be an EndpointRef from add(), got {type(ref).__name__}"
                    )
                endpoint = self._endpoints.get(ref.id)
                if endpoint is None or endpoint.kind != ref.kind:
                    raise EndpointNotFoundError(f"no {ref.kind} endpoint {ref.id!r} on this client")
                return endpoint
            candidates = [
                (i, e)
                for i, e in self._endpoints.items()
                if e.kind == "local" and e.supports(operation)
            ]
        if len(candidates) == 1:
            return candidates[0][1]
        if not candidates:
            raise EndpointNotFoundError(
                f"no endpoint given and no registered local endpoint supports {operation}"
            )
        names = ", ".join(repr(i) for i, _ in candidates)
        raise InvalidRequestError(
            f"endpoint is ambiguous: local endpoints {names} all support {operation}; pass endpoint="
        )

    def text_request(
        self,
        operation: Operation,
        prompt: str | None,
        messages: Iterable[MessageLike] | None,
        options: SippTextOptions | None,
        local: LocalTextOptions | None,
        emit_tokens: bool,
        endpoint_options: Mapping[str, Any] | None,
        provider_options: Mapping[str, Any] | None,
    ) -> TextRequest:
        if options is not None and not isinstance(options, SippTextOptions):
            raise InvalidRequestError("options must be a SippTextOptions")
        if local is not None and not isinstance(local, LocalTextOptions):
            raise InvalidRequestError("local must be a LocalTextOptions")
        msgs: tuple[ChatMessage, ...] | None = None
        if operation == "query":
            if not isinstance(prompt, str):
                raise InvalidRequestError("query needs a prompt string")
        else:
            if messages is None or isinstance(messages, (str, bytes)):
                raise InvalidRequestError("chat needs a list of messages")
            msgs = tuple(ChatMessage.coerce(m) for m in messages)
            if not msgs:
                raise InvalidRequestError("chat needs at least one message")
        return TextRequest(
            operation=operation,  # type: ignore[arg-type]
            prompt=prompt,
            messages=msgs,
            options=options or SippTextOptions(),
            local=local,
            emit_tokens=bool(emit_tokens),
            endpoint_options=endpoint_options,
            provider_options=provider_options,
        )

    def start_text(
        self, ref: EndpointRef | None, request: TextRequest, *, in_loop: bool = False
    ) -> RunChannel[SippTextResponse]:
        """Start a text run. `in_loop`: called from AsyncSippClient inside its event loop,
        so endpoints that do I/O run it as a task there instead of on a thread."""
        endpoint = self.resolve(ref, request.operation)
        if _uses_tools(request) and not endpoint.supports_tools():
            raise UnsupportedOperationError(
                f"this {endpoint.kind} endpoint does not support tool calling yet"
            )
        channel: RunChannel[SippTextResponse] = RunChannel()
        (endpoint.start_text_async if in_loop else endpoint.start_text)(request, channel)
        return channel

    def start_embed(
        self,
        ref: EndpointRef | None,
        input: str,
        local: LocalEmbedOptions | None,
        endpoint_options: Mapping[str, Any] | None,
        provider_options: Mapping[str, Any] | None,
        *,
        in_loop: bool = False,
    ) -> RunChannel[SippEmbeddingResponse]:
        if not isinstance(input, str):
            raise InvalidRequestError("embed needs an input string")
        if local is not None and not isinstance(local, LocalEmbedOptions):
            raise InvalidRequestError("local must be a LocalEmbedOptions")
        endpoint = self.resolve(ref, "embed")
        channel: RunChannel[SippEmbeddingResponse] = RunChannel()
        request = EmbedRequest(input, local, endpoint_options, provider_options)
        (endpoint.start_embed_async if in_loop else endpoint.start_embed)(request, channel)
        return channel

    def start_embed_batch(
        self, ref: EndpointRef, inputs: Sequence[str]
    ) -> list[RunChannel[SippEmbeddingResponse]] | None:
        """One call for all `inputs` when the endpoint batches; None (nothing started) if not."""
        if not inputs or not all(isinstance(i, str) for i in inputs):
            raise InvalidRequestError("embed needs input strings")
        endpoint = self.resolve(ref, "embed")
        requests = [EmbedRequest(text, None) for text in inputs]
        channels: list[RunChannel[SippEmbeddingResponse]] = [RunChannel() for _ in inputs]
        return channels if endpoint.start_embed_batch_async(requests, channels) else None

    def runtime_metrics(self, ref: EndpointRef) -> dict[str, Any]:
        endpoint = self.resolve(ref, "query")
        return endpoint.runtime_metrics()

    def failure(self, ref: EndpointRef) -> str | None:
        return self.resolve(ref, "query").failure()

    def close(self) -> None:
        for endpoint in self.detach_all():
            endpoint.close()

    def detach_all(self) -> list[Endpoint]:
        with self._lock:
            self._closed = True
            endpoints, self._endpoints = list(self._endpoints.values()), {}
        return endpoints


class SippClient:
    """Register endpoints with `add`, then run `query`, `chat` and `embed` on them."""

    def __init__(self) -> None:
        self._registry = _Registry()

    def add(self, id: str, descriptor: EndpointDescriptor) -> EndpointRef:
        """Register (or replace) endpoint `id`. A local model loads here, before returning."""
        if not isinstance(id, str) or not id:
            raise InvalidRequestError("endpoint id must be a non-empty string")
        self._registry.check_open()
        ref, old = self._registry.install(id, _build_endpoint(descriptor, id))
        if old is not None:
            old.close()
        return ref

    def query(
        self,
        prompt: str,
        *,
        endpoint: EndpointRef | None = None,
        options: SippTextOptions | None = None,
        local: LocalTextOptions | None = None,
        emit_tokens: bool = False,
        endpoint_options: Mapping[str, Any] | None = None,
        provider_options: Mapping[str, Any] | None = None,
    ) -> TextRun:
        """Generate from `prompt` exactly as given (no chat template)."""
        request = self._registry.text_request(
            "query", prompt, None, options, local, emit_tokens, endpoint_options, provider_options
        )
        return TextRun(self._registry.start_text(endpoint, request), request.emit_tokens)

    def chat(
        self,
        messages: Iterable[MessageLike],
        *,
        endpoint: EndpointRef | None = None,
        options: SippTextOptions | None = None,
        local: LocalTextOptions | None = None,
        emit_tokens: bool = False,
        endpoint_options: Mapping[str, Any] | None = None,
        provider_options: Mapping[str, Any] | None = None,
    ) -> TextRun:
        """Generate the assistant's reply to `messages` (roles system, user, assistant)."""
        request = self._registry.text_request(
            "chat", None, messages, options, local, emit_tokens, endpoint_options, provider_options
        )
        return TextRun(self._registry.start_text(endpoint, request), request.emit_tokens)

    def embed(
        self,
        input: str,
        *,
        endpoint: EndpointRef | None = None,
        local: LocalEmbedOptions | None = None,
        endpoint_options: Mapping[str, Any] | None = None,
        provider_options: Mapping[str, Any] | None = None,
    ) -> EmbeddingRun:
        """Embed `input` into one vector."""
        channel = self._registry.start_embed(
            endpoint, input, local, endpoint_options, provider_options
        )
        return EmbeddingRun(channel)

    def runtime_metrics(self, endpoint: EndpointRef) -> dict[str, Any]:
        """Counters of a local endpoint (requests, tokens, timings, queue depth, slots)."""
        return self._registry.runtime_metrics(endpoint)

    def endpoint_failure(self, endpoint: EndpointRef) -> str | None:
        """Why `endpoint` stopped serving (its local engine died), or None while it serves."""
        return self._registry.failure(endpoint)

    def close(self) -> None:
        """Stop every endpoint and free its model. In-flight runs end with `ClientClosedError`."""
        self._registry.close()

    def __enter__(self) -> SippClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncSippClient:
    """The asyncio twin of `SippClient`: `await add(...)`, `await run`, `async for batch in run`."""

    def __init__(self) -> None:
        self._registry = _Registry()

    async def add(self, id: str, descriptor: EndpointDescriptor) -> EndpointRef:
        if not isinstance(id, str) or not id:
            raise InvalidRequestError("endpoint id must be a non-empty string")
        self._registry.check_open()
        endpoint = await asyncio.to_thread(_build_endpoint, descriptor, id)
        ref, old = self._registry.install(id, endpoint)
        if old is not None:
            await old.aclose()
        return ref

    def query(
        self,
        prompt: str,
        *,
        endpoint: EndpointRef | None = None,
        options: SippTextOptions | None = None,
        local: LocalTextOptions | None = None,
        emit_tokens: bool = False,
        endpoint_options: Mapping[str, Any] | None = None,
        provider_options: Mapping[str, Any] | None = None,
    ) -> AsyncTextRun:
        request = self._registry.text_request(
            "query", prompt, None, options, local, emit_tokens, endpoint_options, provider_options
        )
        return AsyncTextRun(
            self._registry.start_text(endpoint, request, in_loop=True), request.emit_tokens
        )

    def chat(
        self,
        messages: Iterable[MessageLike],
        *,
        endpoint: EndpointRef | None = None,
        options: SippTextOptions | None = None,
        local: LocalTextOptions | None = None,
        emit_tokens: bool = False,
        endpoint_options: Mapping[str, Any] | None = None,
        provider_options: Mapping[str, Any] | None = None,
    ) -> AsyncTextRun:
        request = self._registry.text_request(
            "chat", None, messages, options, local, emit_tokens, endpoint_options, provider_options
        )
        return AsyncTextRun(
            self._registry.start_text(endpoint, request, in_loop=True), request.emit_tokens
        )

    def embed(
        self,
        input: str,
        *,
        endpoint: EndpointRef | None = None,
        local: LocalEmbedOptions | None = None,
        endpoint_options: Mapping[str, Any] | None = None,
        provider_options: Mapping[str, Any] | None = None,
    ) -> AsyncEmbeddingRun:
        channel = self._registry.start_embed(
            endpoint, input, local, endpoint_options, provider_options, in_loop=True
        )
        return AsyncEmbeddingRun(channel)

    def runtime_metrics(self, endpoint: EndpointRef) -> dict[str, Any]:
        return self._registry.runtime_metrics(endpoint)

    def _embed_batch(
        self, inputs: Sequence[str], *, endpoint: EndpointRef
    ) -> list[AsyncEmbeddingRun] | None:
        """For the gateway server: one run per input, all served by one upstream call, when
        the endpoint takes many inputs per call; None (nothing started) when it does not."""
        channels = self._registry.start_embed_batch(endpoint, inputs)
        return None if channels is None else [AsyncEmbeddingRun(c) for c in channels]

    def endpoint_failure(self, endpoint: EndpointRef) -> str | None:
        """Why `endpoint` stopped serving (its local engine died), or None while it serves."""
        return self._registry.failure(endpoint)

    def _install(self, id: str, endpoint: Endpoint) -> EndpointRef:
        """Register a ready-made endpoint. For the gateway server, which builds local
        endpoints with a per-target backend (public descriptors carry none)."""
        ref, old = self._registry.install(id, endpoint)
        if old is not None:
            old.close()
        return ref

    async def close(self) -> None:
        for endpoint in self._registry.detach_all():
            await endpoint.aclose()

    async def __aenter__(self) -> AsyncSippClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
