"""The Admin Dashboard on the management listener: its page and its JSON API.

Everything lives in this process's memory and resets on restart, as the spec
says: sessions (short-lived, HttpOnly + SameSite=Strict cookie scoped to the
admin path), per-client login throttling, the rolling request history, and
the controls (block an IP, disable a target, change `max_concurrent_requests`
or the rate limit, edit a target's fallback rules), each recorded in an audit list
(every replica's, with Redis shared controls: see `admin_audit`).
The pools, the limits' usage and the caches have their own modules (`admin_pools`,
`admin_limits`, `admin_cache`). Responses never include
the password, token values or provider keys.

The page is static HTML, CSS and JavaScript shipped inside this package
(`admin_ui/`, no build step); `SIPP_GATEWAY_ADMIN_ASSETS_DIR` serves another
directory with the same file names instead.
"""

from __future__ import annotations

import contextlib
import inspect
import ipaddress
import json
import logging
import re
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from .. import protocol
from .._errors import (
    AuthenticationError,
    AuthorizationError,
    EndpointNotFoundError,
    InvalidConfigError,
    InvalidRequestError,
    RateLimitedError,
    SippError,
)
from .admin_audit import AuditLog, session_label
from .admin_cache import cache_view, purge_cache
from .admin_limits import usage_view
from .admin_pools import edit_fallbacks, pools_view
from .app import ANTHROPIC_MESSAGES, OPENAI_ROUTES
from .auth import same_secret, secret_digest
from .call import read_body
from .limits import RateLimitSetting, client_ip, served_over_tls
from .state import GatewayState

__all__ = ["AdminState", "admin_routes", "admin_state"]

logger = logging.getLogger("sipp.gateway.admin")

SESSION_SECONDS = 15 * 60
UI_DIR = Path(__file__).with_name("admin_ui")
_ASSETS = {"index.html", "admin.js", "admin.css"}  # served by name; nothing else is reachable
# The page loads only its own files and talks only to its own origin.
_PAGE_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
COOKIE = "sipp_admin"
CSRF_HEADER = "x-sipp-admin-csrf"
MAX_FAILURES, FAILURE_WINDOW = 5, 300.0  # then logins from that client wait out the window
MAX_TRACKED_CLIENTS = 10_000
MAX_ADMIN_BODY = 16_384  # bytes; the largest admin request is a small JSON object
_REPLICA_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")


@dataclass
class _Session:
    csrf: str
    expires: float


class AdminState:
    def __init__(
        self,
        password: str,
        *,
        session_seconds: int = SESSION_SECONDS,
        assets_dir: Path | None = None,
        replica: str | None = None,
    ) -> None:
        self._password = secret_digest(password)
        self.session_seconds = session_seconds
        self.assets_dir = assets_dir or UI_DIR
        self.sessions: dict[str, _Session] = {}
        self.failures: dict[str, deque[float]] = {}
        self.audit = AuditLog()
        self.replica = replica  # names this replica's audit entries (default: host:port)

    def check_password(self, given: str) -> bool:
        return same_secret(given, self._password)

    def throttle(self, client: str, now: float) -> None:
        recent = self.failures.get(client)
        if recent is not None:
            while recent and now - recent[0] > FAILURE_WINDOW:
                recent.popleft()
            if len(recent) >= MAX_FAILURES:
                raise RateLimitedError("too many failed logins from this client; try again later")

    def failed(self, client: str, now: float) -> None:
        self.failures.setdefault(client, deque(maxlen=MAX_FAILURES)).append(now)
        if len(self.failures) > MAX_TRACKED_CLIENTS:
            # Many addresses guessing at once: forget those whose window has passed, then
            # the longest quiet, so the table stays bounded.
            for key in [k for k, v in self.failures.items() if now - v[-1] > FAILURE_WINDOW]:
                del self.failures[key]
            while len(self.failures) > MAX_TRACKED_CLIENTS:
                del self.failures[min(self.failures, key=lambda k: self.failures[k][-1])]

    def session(self, request: Request, now: float) -> tuple[str, _Session]:
        sid = request.cookies.get(COOKIE, "")
        session = self.sessions.get(sid)
        if session is None or session.expires < now:
            self.sessions.pop(sid, None)
            raise AuthenticationError("no valid admin session; log in first")
        return sid, session


def admin_state(password: str, env: Mapping[str, str]) -> AdminState:
    """AdminState with the process's optional overrides: `SIPP_GATEWAY_ADMIN_SESSION_SECONDS`
    (session lifetime, 1 to 86400, default 900), `SIPP_GATEWAY_ADMIN_ASSETS_DIR` and
    `SIPP_GATEWAY_REPLICA_ID` (how this replica's audit entries are named)."""
    raw = env.get("SIPP_GATEWAY_ADMIN_SESSION_SECONDS", "").strip()
    seconds = SESSION_SECONDS
    if raw:
        if not raw.isdigit() or not 1 <= int(raw) <= 86_400:
            raise InvalidConfigError(
                "SIPP_GATEWAY_ADMIN_SESSION_SECONDS must be a whole number from 1 to 86400"
            )
        seconds = int(raw)
    assets = env.get("SIPP_GATEWAY_ADMIN_ASSETS_DIR", "").strip()
    if assets and not (Path(assets) / "index.html").is_file():
        raise InvalidConfigError(f"SIPP_GATEWAY_ADMIN_ASSETS_DIR: no index.html in {assets}")
    replica = env.get("SIPP_GATEWAY_REPLICA_ID", "").strip() or None
    if replica is not None and not _REPLICA_ID.match(replica):
        raise InvalidConfigError(
            "SIPP_GATEWAY_REPLICA_ID must be 1 to 64 letters, digits or ._:- characters"
        )
    return AdminState(
        password,
        session_seconds=seconds,
        assets_dir=Path(assets) if assets else None,
        replica=replica,
    )


def admin_routes(state: GatewayState, admin: AdminState, base: str) -> list[Route]:
    config = state.config
    replica = admin.replica or f"{socket.gethostname()}:{config.public_bind[1]}"

    def error(exc: SippError) -> JSONResponse:
        return JSONResponse(
            protocol.error_body(exc.code, exc.message), status_code=protocol.status_for(exc)
        )

    def who(request: Request) -> str:
        return client_ip(
            request.client.host if request.client else None, request.headers, config.security
        )

    async def body_json(request: Request) -> dict[str, Any]:
        # Counted as it arrives, like the public routes: a lying or missing
        # content-length (chunked) cannot make the server buffer more than the limit.
        raw = await read_body(request, MAX_ADMIN_BODY, "the admin API's limit")
        try:
            obj = json.loads(raw or b"{}")
        except ValueError:
            raise InvalidRequestError("admin request body is not JSON") from None
        if not isinstance(obj, dict):
            raise InvalidRequestError("admin request body must be a JSON object")
        return obj

    def mutating(request: Request, now: float) -> str:
        sid, session = admin.session(request, now)
        given = request.headers.get(CSRF_HEADER, "")
        if not same_secret(given, secret_digest(session.csrf)):
            raise AuthorizationError(f"missing or wrong {CSRF_HEADER} header")
        return sid

    async def record(sid: str, action: str, detail: dict[str, Any]) -> None:
        session = session_label(sid)
        entry = {"at": time.time(), "replica": replica, "session": session, "action": action}
        await admin.audit.add(state.shared, {**entry, **detail})
        details = " ".join(f"{k}={v}" for k, v in detail.items())
        logger.info("admin %s by session %s %s", action, session, details)

    async def session_route(request: Request) -> Response:
        now = time.monotonic()
        try:
            if request.method == "POST":
                client = who(request)
                admin.throttle(client, now)
                password = (await body_json(request)).get("password")
                if not isinstance(password, str) or not admin.check_password(password):
                    admin.failed(client, now)
                    raise AuthenticationError("wrong password")
                sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
                lifetime = admin.session_seconds
                admin.sessions[sid] = _Session(csrf, now + lifetime)
                # Expired sessions go when someone logs in, so the map stays small.
                for old in [k for k, v in admin.sessions.items() if v.expires < now]:
                    del admin.sessions[old]
                response = JSONResponse({"csrf_token": csrf, "expires_in": lifetime})
                response.set_cookie(
                    COOKIE,
                    sid,
                    max_age=lifetime,
                    path=base or "/",
                    httponly=True,
                    samesite="strict",
                    secure=served_over_tls(
                        request.url.scheme,
                        request.client.host if request.client else None,
                        request.headers,
                        config.security,
                    ),
                )
                await record(sid, "login", {"client": client})
                return response
            if request.method == "DELETE":
                sid = mutating(request, now)
                admin.sessions.pop(sid, None)
                await record(sid, "logout", {})
                response = JSONResponse({"logged_out": True})
                response.delete_cookie(COOKIE, path=base or "/")
                return response
            _, session = admin.session(request, now)
            return JSONResponse(
                {
                    "authenticated": True,
                    "csrf_token": session.csrf,
                    "expires_in": int(session.expires - now),
                }
            )
        except SippError as exc:
            return error(exc)

    def needs_session(read: Callable[[], Any]) -> Callable[[Request], Awaitable[Response]]:
        """A GET route answering `read()` (awaited when it is a coroutine) as JSON to a
        live session, 401 otherwise."""

        async def route(request: Request) -> Response:
            try:
                admin.session(request, time.monotonic())
            except SippError as exc:
                return error(exc)
            data = read()
            if inspect.isawaitable(data):
                data = await data
            return JSONResponse(data)

        return route

    def overview() -> dict[str, Any]:
        targets = []
        for t in config.targets:
            entry: dict[str, Any] = {
                "name": t.name,
                "type": t.type,
                "state": state.target_state(t.name),
                "disabled": t.name in state.disabled_targets,
                "health": _health(state, t.name),
                "last_error": state.activity.last_error.get(t.name),
            }
            if t.type == "local":
                entry["backend_requested"] = entry["backend"] = getattr(t, "backend", "auto")
                ref = state.targets.get(t.name)
                if ref is not None:  # what `auto` (or the env override) actually chose
                    with contextlib.suppress(SippError):
                        entry["backend"] = state.client.runtime_metrics(ref)["backend"]
            targets.append(entry)
        return {
            "listeners": {
                "public": "{}:{}".format(*config.public_bind),
                "management": "{}:{}".format(*config.management_bind),
            },
            "routes": {k: v for k, v in config.routes.__dict__.items() if v is not None},
            "openai_routes": list(OPENAI_ROUTES),
            "anthropic_routes": [ANTHROPIC_MESSAGES],
            "targets": targets,
            "tokens": [
                {"caller": c.label, "targets": sorted(c.targets) or ["*"]}
                for c in state.tokens.callers
            ],
            "controls": {
                "blocked_ips": sorted(state.blocked_ips),
                "max_concurrent_requests": state.limit.limit,
                "rate_limit": None
                if state.rate_limiter is None
                else {
                    "requests_per_minute": round(state.rate_limiter.rate * 60),
                    "burst": int(state.rate_limiter.burst),
                },
            },
            "in_flight": state.limit.in_flight,
        }

    async def page(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        path = admin.assets_dir / name
        if name not in _ASSETS or not path.is_file():
            return error(EndpointNotFoundError(f"no admin asset {name!r}"))
        return FileResponse(path, headers=_PAGE_HEADERS)

    async def slash(request: Request) -> Response:
        return RedirectResponse(f"{base}/", status_code=308)

    async def control(request: Request) -> Response:
        action = request.path_params["action"]
        try:
            sid = mutating(request, time.monotonic())
            body = await body_json(request)
            if action in ("block", "unblock"):
                try:
                    ip = str(ipaddress.ip_address(str(body.get("ip", ""))))
                except ValueError:
                    raise InvalidRequestError("'ip' must be an IP address") from None
                if state.shared is not None:  # every replica's, through Redis
                    await state.shared.change("blocked_ips", ip, action == "block")
                else:
                    (state.blocked_ips.add if action == "block" else state.blocked_ips.discard)(ip)
                await record(sid, action, {"ip": ip})
            elif action in ("disable_target", "enable_target"):
                name = body.get("target")
                if name not in {t.name for t in config.targets}:
                    raise InvalidRequestError("'target' must name a configured target")
                if state.shared is not None:
                    await state.shared.change("disabled_targets", name, action == "disable_target")
                else:
                    (
                        state.disabled_targets.add
                        if action == "disable_target"
                        else state.disabled_targets.discard
                    )(name)
                await record(sid, action, {"target": name})
            elif action == "max_concurrent_requests":
                value = body.get("value")
                if value is not None and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 1
                ):
                    raise InvalidRequestError(
                        "'value' must be a positive integer or null (unbounded)"
                    )
                state.limit.limit = value
                await record(sid, action, {"value": value})
            elif action == "rate_limit":
                await record(sid, action, await _set_rate_limit(state, body))
            elif action == "fallbacks":
                await record(sid, action, await edit_fallbacks(state, body))
            else:
                raise InvalidRequestError(f"unknown control {action!r}")
            return JSONResponse({"ok": True})
        except SippError as exc:
            return error(exc)

    async def purge(request: Request) -> Response:
        try:
            sid = mutating(request, time.monotonic())
            detail = await purge_cache(state, await body_json(request))
            await record(sid, "cache_purge", detail)
            return JSONResponse({"ok": True, **detail})
        except SippError as exc:
            return error(exc)

    return [
        *([Route(base, slash, methods=["GET"])] if base else []),
        Route(f"{base}/", page, methods=["GET"]),
        Route(f"{base}/assets/{{name}}", page, methods=["GET"]),
        Route(f"{base}/api/session", session_route, methods=["GET", "POST", "DELETE"]),
        Route(f"{base}/api/overview", needs_session(overview), methods=["GET"]),
        Route(
            f"{base}/api/metrics",
            needs_session(lambda: state.activity.snapshot(state.limit.in_flight)),
            methods=["GET"],
        ),
        Route(
            f"{base}/api/audit",
            needs_session(lambda: admin.audit.view(state.shared)),
            methods=["GET"],
        ),
        Route(f"{base}/api/pools", needs_session(lambda: pools_view(state)), methods=["GET"]),
        Route(f"{base}/api/usage", needs_session(lambda: usage_view(state)), methods=["GET"]),
        Route(f"{base}/api/controls/{{action}}", control, methods=["POST"]),
        Route(f"{base}/api/cache", needs_session(lambda: cache_view(state)), methods=["GET"]),
        Route(f"{base}/api/cache/purge", purge, methods=["POST"]),
    ]


async def _set_rate_limit(state: GatewayState, body: dict[str, Any]) -> dict[str, Any]:
    """Set the per-client rate limit (every replica's, with Redis), or `reset: true` for
    `[security.rate_limit]` again; what the audit records of it."""
    if body.get("reset", False) is not False:
        if body != {"reset": True}:
            raise InvalidRequestError("'reset' must be true and takes no other field")
        setting = None
    else:
        setting = RateLimitSetting.parse(body)
    if state.shared is not None:
        await state.shared.set_rate_limit(setting)
    else:
        configured = RateLimitSetting.configured(state.config.security)
        state.rate_limiter = (setting or configured).in_memory()
    return {"reset": True} if setting is None else setting._asdict()


def _health(state: GatewayState, name: str) -> str:
    """`healthy`, `degraded` (failed a request in the last minute), `disabled`,
    `loading` or `failed` (did not load, or its engine died)."""
    load = state.target_state(name)
    if load != "loaded":
        return load
    if name in state.disabled_targets:
        return "disabled"
    last = state.activity.last_error.get(name)
    return "degraded" if last is not None and time.time() - last["at"] < 60 else "healthy"
