"""The gateway's two ASGI apps: public inference routes and the management listener.

A public route is a wire format (`formats/`) served by the request pipeline
(`call.serve`): client checks, authentication, decode, admission, execution,
encode and settle, with one place that guarantees cleanup. Errors are the
format's JSON envelope (or its error frame once a stream has started);
nothing else, and never a traceback, reaches the client.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .._errors import SippError
from .cache.exact import CACHE_HEADER, MATCH_HEADER
from .call import check_client, serve
from .formats.anthropic import AnthropicFormat
from .formats.base import WireFormat
from .formats.native import NativeFormat
from .formats.openai import OpenAIFormat, openai_error
from .formats.openai_responses import OpenAIResponsesFormat
from .limits import SharedRateLimiter
from .routing import ROUTE_HEADER
from .shaping import RATE_LIMIT_HEADERS, Shaper
from .state import GatewayState, resolve_target

__all__ = [
    "ANTHROPIC_MESSAGES",
    "OPENAI_ROUTES",
    "GatewayState",
    "build_management_app",
    "build_public_app",
    "resolve_target",
]

OPENAI_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/responses",
)
ANTHROPIC_MESSAGES = "/v1/messages"


def build_public_app(state: GatewayState) -> Starlette:
    config = state.config

    def route(path: str, fmt: WireFormat) -> Route:
        async def endpoint(request: Request) -> Response:
            response = await serve(state, request, fmt)
            if state.shaper is not None:  # the reserve stage left the limits' headers
                limits = getattr(request.state, "limit_headers", None)
                if limits:
                    response.headers.update(limits)
            return response

        return Route(path, endpoint, methods=["POST"])

    routes = [
        route(config.routes.query, NativeFormat("query")),
        route(config.routes.chat, NativeFormat("chat")),
        route(config.routes.embed, NativeFormat("embed")),
        route(OPENAI_ROUTES[0], OpenAIFormat("chat")),
        route(OPENAI_ROUTES[1], OpenAIFormat("completion")),
        route(OPENAI_ROUTES[2], OpenAIFormat("embeddings")),
        Route(OPENAI_ROUTES[3], _models(state), methods=["GET"]),
        route(OPENAI_ROUTES[4], OpenAIResponsesFormat()),
        route(ANTHROPIC_MESSAGES, AnthropicFormat()),
    ]
    middleware = []
    if config.allowed_origins:  # an empty allowlist means no CORS layer at all
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.allowed_origins),
                allow_methods=["POST", "OPTIONS"],
                allow_headers=[
                    "authorization",
                    "content-type",
                    "x-request-id",
                    "x-api-key",
                    "anthropic-version",
                    "cache-control",
                ],
                expose_headers=[
                    "x-request-id",
                    "retry-after",
                    CACHE_HEADER,
                    MATCH_HEADER,
                    ROUTE_HEADER,
                    *RATE_LIMIT_HEADERS,
                ],
                max_age=600,
            )
        )
    return Starlette(routes=routes, middleware=middleware)


def _models(state: GatewayState) -> Callable[[Request], Awaitable[Response]]:
    """`GET /v1/models`: the targets this caller's token may use."""

    async def models(request: Request) -> Response:
        try:
            # blocked addresses and rate limits, like every route
            await check_client(state, request)
            caller = state.tokens.authenticate(request.headers.get("authorization"))
        except SippError as exc:
            return openai_error(exc, uuid.uuid4().hex)
        data = [
            {"id": t.name, "object": "model", "created": 0, "owned_by": "sipp"}
            for t in state.config.targets
            if caller.may_use(t.name)
        ]
        return JSONResponse({"object": "list", "data": data})

    return models


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
        if not state.ready or failed:
            return PlainTextResponse("not ready", status_code=503)
        limits: list[Shaper | SharedRateLimiter] = [] if state.shaper is None else [state.shaper]
        if isinstance(state.rate_limiter, SharedRateLimiter):
            limits.append(state.rate_limiter)
        if limits and not await limits[0].available():  # one store: asking one is enough
            # A limit that fails closed refuses every request it covers: leave the rotation.
            if any(limit.fail_closed for limit in limits):
                return PlainTextResponse("not ready: state store unavailable", status_code=503)
            return PlainTextResponse("ready: state store unavailable, limits fail open")
        return PlainTextResponse("ready")

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
