"""The gateway's two ASGI apps: public inference routes and the management listener.

Each public request: authenticate, read the body within `max_request_bytes`,
decode with `sipp.protocol`, resolve and authorize the target, take an
admission permit, run it on the shared `AsyncSippClient`, encode. Errors are
the profile's JSON envelope (or an `event: error` frame once a stream has
started); nothing else, and never a traceback, reaches the client.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import protocol
from .._client import AsyncSippClient
from .._descriptors import EndpointRef
from .._errors import (
    AuthorizationError,
    ClientClosedError,
    EndpointNotFoundError,
    ExecutionError,
    PayloadTooLargeError,
    RateLimitedError,
    SippError,
    UnavailableError,
)
from .._runs import AsyncTextRun
from .._types import SippTextResponse, TokenBatch
from ..protocol.streaming import SSE_HEADERS, text_stream_frames_async
from .activity import Activity, RequestRecord
from .auth import Caller, TokenTable
from .config import GatewayConfig
from .limits import ConcurrencyLimit, RateLimiter, client_ip
from .metrics import GatewayMetrics
from .upstream import caller_error, from_upstream, log_upstream

__all__ = [
    "GatewayState",
    "PublicCall",
    "build_management_app",
    "build_public_app",
    "resolve_target",
    "serve_public",
]

logger = logging.getLogger("sipp.gateway")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


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

    def __post_init__(self) -> None:
        self.limit = ConcurrencyLimit(self.config.max_concurrent_requests)
        security = self.config.security
        self.rate_limiter = (
            RateLimiter(security.requests_per_minute, security.burst)
            if security.rate_limit_enabled
            else None
        )
        self.metrics = GatewayMetrics(self.local_stats)
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
    """The endpoint serving public target `name`: 404 if unknown, 500 if it failed to load."""
    if name in state.target_errors:
        raise ExecutionError(f"target {name!r} failed to load")
    if name in state.disabled_targets:
        raise UnavailableError(f"target {name!r} is disabled by an operator")
    ref = state.targets.get(name)
    if ref is None:
        if not state.ready and name in {t.name for t in state.config.targets}:
            raise ExecutionError(f"target {name!r} is still loading")
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


def check_client(state: GatewayState, request: Request) -> str:
    """Refuse blocked client addresses (403) and clients over their rate limit (429);
    the client's address otherwise."""
    peer = request.client.host if request.client else None
    ip = client_ip(peer, request.headers, state.config.security)
    if ip in state.blocked_ips:
        raise AuthorizationError("this client address is blocked")
    if state.rate_limiter is not None:
        try:
            state.rate_limiter.check(ip)
        except RateLimitedError:
            state.refused("rate_limited")
            raise
    return ip


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def error_headers(exc: SippError, request_id: str) -> dict[str, str]:
    """`x-request-id`, plus `Retry-After` when the refusal says how long to wait."""
    headers = {"x-request-id": request_id}
    if exc.retry_after is not None:
        headers["retry-after"] = str(math.ceil(exc.retry_after))
    return headers


def _error(exc: SippError, request_id: str) -> JSONResponse:
    return JSONResponse(
        protocol.error_body(exc.code, exc.message),
        status_code=protocol.status_for(exc),
        headers=error_headers(exc, request_id),
    )


async def read_body(request: Request, limit: int, name: str = "max_request_bytes") -> bytes:
    """The body, refused with 413 as soon as more than `limit` bytes are declared or arrive."""
    too_large = f"request body exceeds {name} ({limit} bytes)"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(too_large)
    body = bytearray()
    async for chunk in request.stream():  # counts bytes actually received, chunked bodies too
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(too_large)
    return bytes(body)


class _Run(Protocol):
    @property
    def done(self) -> bool: ...

    def cancel(self, reason: str | None = None) -> None: ...


_R = TypeVar("_R", bound=_Run)
_T = TypeVar("_T")


class PublicCall:
    """One public request, whatever its route family: its metrics record and its
    admission permit, from authentication until the response (or its stream) ends."""

    def __init__(self, state: GatewayState, request: Request, operation: str) -> None:
        self.state, self.request = state, request
        self.request_id = _request_id(request)
        self.rec = state.record(operation)
        self._permit = False
        self._runs: list[_Run] = []
        self._ip = ""

    async def open(self) -> tuple[Caller, bytes]:
        """Refuse blocked or rate-limited clients, authenticate, read the body within limits."""
        self._ip = check_client(self.state, self.request)
        caller = self.state.tokens.authenticate(self.request.headers.get("authorization"))
        self.rec.caller = caller.label
        return caller, await read_body(self.request, self.state.config.max_request_bytes)

    def charge(self, cost: int) -> None:
        """Make this request cost `cost` rate-limit tokens (an embedding batch: one per
        input). `open` took the first; the rest are taken all or none, else 429."""
        limiter = self.state.rate_limiter
        if limiter is None or cost <= 1:
            return
        try:
            if cost > limiter.burst:  # waiting never helps: say so rather than invite retries
                raise RateLimitedError(
                    f"this request costs {cost} rate-limit tokens (one per input), more than "
                    f"the burst ({int(limiter.burst)}); send fewer inputs per request"
                )
            limiter.check(self._ip, cost=cost - 1)
        except RateLimitedError:
            self.state.refused("rate_limited")
            raise

    def track(self, run: _R) -> _R:
        """A run this request started: `close` cancels it unless it finished or a stream
        took it over, so no failure path leaves a generation or upstream call running."""
        self._runs.append(run)
        return run

    def admit(self, caller: Caller, target: str) -> EndpointRef:
        """Resolve and authorize `target`, then take an admission permit."""
        ref = resolve_target(self.state, target)
        self.rec.target = target
        self.state.tokens.authorize(caller, target)
        _acquire(self.state)
        self._permit = True
        return ref

    async def wait(self, run: AsyncTextRun) -> SippTextResponse:
        """The run's response, or cancel it if the client hangs up first."""
        t0 = time.perf_counter()
        response = await unless_disconnected(self.request, run.result())
        self.rec.waited = time.perf_counter() - t0
        self.rec.usage(response.usage)
        return response

    async def accepted(self, run: AsyncTextRun) -> None:
        """Before a stream commits to 200: wait until the endpoint accepted `run`, and
        raise its refusal (a prompt over the context, a bad grammar) as its own status."""
        if run._preparing:  # remote runs are accepted at once: no watcher task for them
            await unless_disconnected(self.request, run._accepted())
        if run.done:
            await run.result()

    def hand_over(self) -> RequestRecord:
        """A stream takes the permit and the record; it releases and finishes them."""
        self._permit = False
        self.rec.stream = True
        return self.rec

    def close(self) -> None:
        if not self.rec.stream:
            for run in self._runs:
                if not run.done:
                    run.cancel("the request failed")
        if self._permit:
            _release(self.state)
        if not self.rec.stream:
            self.rec.finish()


ErrorRenderer = Callable[[SippError, str], Response]


async def serve_public(
    call: PublicCall, work: Callable[[PublicCall], Awaitable[Response]], render: ErrorRenderer
) -> Response:
    """Run `work`, turning any failure into `render`'s error body (never a traceback)."""
    try:
        return await work(call)
    except SippError as exc:
        exc = for_caller(call.state, call.rec.target, exc)
        call.rec.fail(exc.code)
        return render(exc, call.request_id)
    except Exception:
        logger.exception(
            "unexpected error serving %s request %s", call.rec.operation, call.request_id
        )
        call.rec.fail("execution")
        return render(ExecutionError("internal error"), call.request_id)
    finally:
        call.close()


def build_public_app(state: GatewayState) -> Starlette:
    config = state.config

    async def embed_work(call: PublicCall) -> Response:
        caller, body = await call.open()
        req = protocol.decode_embed_body(body)
        ref = call.admit(caller, req.target)
        t0 = time.perf_counter()
        run = call.track(state.client.embed(req.input, endpoint=ref))
        embedding = await unless_disconnected(call.request, run.result())
        call.rec.waited = time.perf_counter() - t0
        call.rec.usage(embedding.usage)
        payload = protocol.embedding_response_body(req.target, embedding, id=call.request_id)
        return JSONResponse(payload, headers={"x-request-id": call.request_id})

    async def text_work(call: PublicCall) -> Response:
        caller, body = await call.open()
        query = call.rec.operation == "query"
        req = (protocol.decode_query_body if query else protocol.decode_chat_body)(body)
        ref = call.admit(caller, req.target)
        if req.operation == "query":
            assert req.prompt is not None
            run = state.client.query(
                req.prompt, endpoint=ref, options=req.options, emit_tokens=req.stream
            )
            call.track(run)
        else:
            assert req.messages is not None
            run = state.client.chat(
                req.messages, endpoint=ref, options=req.options, emit_tokens=req.stream
            )
            call.track(run)
        if req.stream:
            await call.accepted(run)
            headers = {**SSE_HEADERS, "x-request-id": call.request_id}
            return StreamingResponse(_stream(state, run, call.hand_over()), headers=headers)
        response = await call.wait(run)
        payload = protocol.text_response_body(req.target, response, id=call.request_id)
        return JSONResponse(payload, headers={"x-request-id": call.request_id})

    async def handle(request: Request, operation: str) -> Response:
        work = embed_work if operation == "embed" else text_work
        return await serve_public(PublicCall(state, request, operation), work, _error)

    async def query(request: Request) -> Response:
        return await handle(request, "query")

    async def chat(request: Request) -> Response:
        return await handle(request, "chat")

    async def embed(request: Request) -> Response:
        return await handle(request, "embed")

    routes = [
        Route(config.routes.query, query, methods=["POST"]),
        Route(config.routes.chat, chat, methods=["POST"]),
        Route(config.routes.embed, embed, methods=["POST"]),
    ]
    from .openai_compat import openai_routes  # imports this module's helpers

    routes += openai_routes(state)
    middleware = []
    if config.allowed_origins:  # an empty allowlist means no CORS layer at all
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.allowed_origins),
                allow_methods=["POST", "OPTIONS"],
                allow_headers=["authorization", "content-type", "x-request-id"],
                expose_headers=["x-request-id"],
                max_age=600,
            )
        )
    return Starlette(routes=routes, middleware=middleware)


async def unless_disconnected(request: Request, work: Awaitable[_T]) -> _T:
    """`work`'s result; if the client hangs up first, cancel `work` (a run's `result()`
    cancels the run when cancelled, freeing its slot or upstream request) instead of
    finishing work nobody will read."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    result = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not result.done():
            result.cancel()
    if not result.done() or result.cancelled():
        raise ClientClosedError("client disconnected before the response was ready")
    return result.result()


def _acquire(state: GatewayState) -> None:
    try:
        state.limit.acquire()
    except SippError:
        state.refused("admission_rejected")
        raise
    state.metrics.in_flight.inc()
    state.activity.in_flight(state.limit.in_flight)


def _release(state: GatewayState) -> None:
    state.activity.in_flight(state.limit.in_flight)
    state.limit.release()
    state.metrics.in_flight.dec()


async def settle(rec: RequestRecord, run: AsyncTextRun) -> None:
    """Fill in how a streamed run ended: its usage, its error code, or `client_closed`
    when the consumer went away before the end."""
    if not run.done:
        rec.fail("client_closed")
        return
    try:
        rec.usage((await run.result()).usage)
    except SippError as exc:
        rec.fail(caller_error(exc).code)
    except Exception:
        rec.fail("execution")


class _ForCaller:
    """A streamed run whose failures reach the wire as `for_caller` renders them (an
    upstream provider's own message and status stay in the log)."""

    def __init__(self, state: GatewayState, run: AsyncTextRun, target: str | None) -> None:
        self._state, self._run, self._target = state, run, target

    @property
    def done(self) -> bool:
        return self._run.done

    def cancel(self, reason: str | None = None) -> None:
        self._run.cancel(reason)

    async def result(self) -> SippTextResponse:
        try:
            return await self._run.result()
        except SippError as exc:
            raise for_caller(self._state, self._target, exc) from None

    async def __aiter__(self) -> AsyncIterator[TokenBatch]:
        try:
            async for batch in self._run:
                yield batch
        except SippError as exc:
            raise for_caller(self._state, self._target, exc) from None


async def _stream(
    state: GatewayState, run: AsyncTextRun, rec: RequestRecord
) -> AsyncIterator[bytes]:
    """The run's SSE frames; releases the admission permit however the stream ends
    (finished, failed, or the client went away, which cancels the run)."""
    try:
        async for frame in text_stream_frames_async(_ForCaller(state, run, rec.target)):
            if rec.ttft is None and frame.startswith(b"event: token"):
                rec.first_token()
            yield frame
    finally:
        _release(state)
        await settle(rec, run)
        rec.finish()
        if not run.done:  # the consumer went away: free the slot now, not when collected
            run.cancel("client disconnected")


def build_management_app(state: GatewayState) -> Starlette:
    routes_cfg = state.config.routes

    async def index(request: Request) -> Response:
        return JSONResponse(
            {
                "service": "sipp-gateway",
                "ready": state.ready,
                "public_routes": {
                    "query": routes_cfg.query,
                    "chat": routes_cfg.chat,
                    "embed": routes_cfg.embed,
                },
                "management_routes": {
                    k: v
                    for k, v in routes_cfg.__dict__.items()
                    if k not in ("query", "chat", "embed") and v is not None
                },
                "targets": [
                    {
                        "name": t.name,
                        "type": t.type,
                        "state": state.target_state(t.name),
                    }
                    for t in state.config.targets
                ],
            }
        )

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readiness(request: Request) -> Response:
        failed = any(state.target_state(t.name) == "failed" for t in state.config.targets)
        if state.ready and not failed:
            return PlainTextResponse("ready")
        return PlainTextResponse("not ready", status_code=503)

    async def metrics_route(request: Request) -> Response:
        return Response(
            state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    table = [
        (routes_cfg.index, index),
        (routes_cfg.health, health),
        (routes_cfg.readiness, readiness),
        (routes_cfg.metrics, metrics_route),
    ]
    routes = [Route(path, fn, methods=["GET"]) for path, fn in table if path is not None]
    if routes_cfg.admin is not None and state.admin is not None:
        from .admin import admin_routes

        routes += admin_routes(state, state.admin, routes_cfg.admin.rstrip("/"))
    return Starlette(routes=routes)
