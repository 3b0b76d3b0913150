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
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

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
from .._types import SippTextResponse
from ..protocol.streaming import SSE_HEADERS, text_stream_frames_async
from .activity import Activity, RequestRecord
from .auth import TokenTable
from .config import GatewayConfig
from .limits import ConcurrencyLimit, RateLimiter, client_ip
from .metrics import GatewayMetrics

__all__ = ["GatewayState", "build_management_app", "build_public_app", "resolve_target"]

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
        """`loading`, `loaded` or `failed`."""
        if name in self.target_errors:
            return "failed"
        return "loaded" if name in self.targets else "loading"

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
    return ref


def check_client(state: GatewayState, request: Request) -> None:
    """Refuse blocked client addresses (403) and clients over their rate limit (429)."""
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


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def _error(exc: SippError, request_id: str) -> JSONResponse:
    return JSONResponse(
        protocol.error_body(exc.code, exc.message),
        status_code=protocol.status_for(exc),
        headers={"x-request-id": request_id},
    )


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body exceeds max_request_bytes ({limit})")
    body = bytearray()
    async for chunk in request.stream():  # counts bytes actually received, chunked bodies too
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(f"request body exceeds max_request_bytes ({limit})")
    return bytes(body)


def build_public_app(state: GatewayState) -> Starlette:
    config = state.config

    async def handle(request: Request, operation: str) -> Response:
        request_id = _request_id(request)
        rec = state.record(operation)
        permit = False
        try:
            check_client(state, request)
            caller = state.tokens.authenticate(request.headers.get("authorization"))
            rec.caller = caller.label
            body = await _read_body(request, config.max_request_bytes)
            if operation == "embed":
                embed_req = protocol.decode_embed_body(body)
                ref = resolve_target(state, embed_req.target)
                rec.target = embed_req.target
                state.tokens.authorize(caller, embed_req.target)
                _acquire(state)
                permit = True
                t0 = time.perf_counter()
                embedding = await state.client.embed(embed_req.input, endpoint=ref)
                rec.waited = time.perf_counter() - t0
                rec.usage(embedding.usage)
                payload = protocol.embedding_response_body(
                    embed_req.target, embedding, id=request_id
                )
                return JSONResponse(payload, headers={"x-request-id": request_id})
            decode = (
                protocol.decode_query_body if operation == "query" else protocol.decode_chat_body
            )
            req = decode(body)
            ref = resolve_target(state, req.target)
            rec.target = req.target
            state.tokens.authorize(caller, req.target)
            _acquire(state)
            permit = True
            if req.operation == "query":
                assert req.prompt is not None
                run = state.client.query(
                    req.prompt, endpoint=ref, options=req.options, emit_tokens=req.stream
                )
            else:
                assert req.messages is not None
                run = state.client.chat(
                    req.messages, endpoint=ref, options=req.options, emit_tokens=req.stream
                )
            if req.stream:
                permit = False  # the stream releases it and finishes the record when it ends
                rec.stream = True
                headers = {**SSE_HEADERS, "x-request-id": request_id}
                return StreamingResponse(_stream(state, run, rec), headers=headers)
            t0 = time.perf_counter()
            response = await _unless_disconnected(request, run)
            rec.waited = time.perf_counter() - t0
            rec.usage(response.usage)
            payload = protocol.text_response_body(req.target, response, id=request_id)
            return JSONResponse(payload, headers={"x-request-id": request_id})
        except SippError as exc:
            rec.fail(exc.code)
            return _error(exc, request_id)
        except Exception:
            logger.exception("unexpected error serving %s request %s", operation, request_id)
            rec.fail("execution")
            return _error(ExecutionError("internal error"), request_id)
        finally:
            if permit:
                _release(state)
            if not rec.stream:
                rec.finish()

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


async def _unless_disconnected(request: Request, run: AsyncTextRun) -> SippTextResponse:
    """The run's response; if the client hangs up first, cancel the run (freeing its slot
    or upstream request) instead of finishing work nobody will read."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    result = asyncio.ensure_future(run.result())
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not result.done():
        run.cancel("client disconnected")
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
        rec.fail(exc.code)
    except Exception:
        rec.fail("execution")


async def _stream(
    state: GatewayState, run: AsyncTextRun, rec: RequestRecord
) -> AsyncIterator[bytes]:
    """The run's SSE frames; releases the admission permit however the stream ends
    (finished, failed, or the client went away, which cancels the run)."""
    try:
        async for frame in text_stream_frames_async(run):
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
        if state.ready and not state.target_errors:
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
