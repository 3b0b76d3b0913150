"""The request pipeline: every public route, whatever its wire format, runs here.

    client checks -> authenticate -> read + decode (format) -> charge -> route (only a
    name `[[route_rules]]` match: rules -> target) -> resolve, authorize -> cache lookup
    (a hit: reserve one request, replay, encode) -> reserve (limits) -> admit -> execute
    -> encode (format, JSON or stream) -> settle (usage -> limits, cache store, record)

`serve` runs the stages in order and owns cleanup: whatever fails, runs the
request started are cancelled, its admission permit is released and its record
finishes exactly once (a stream takes both over and does the same when it ends).
Nothing starts before the whole body is decoded and every check has passed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Protocol, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from .._client import AsyncSippClient
from .._descriptors import EndpointRef
from .._errors import (
    AuthorizationError,
    ClientClosedError,
    ExecutionError,
    PayloadTooLargeError,
    RateLimitedError,
    SippError,
)
from .._runs import AsyncTextRun
from .._types import SippTextResponse
from .activity import RequestRecord
from .auth import Caller
from .cache.entry import CachedEntry
from .cache.exact import CacheCall, ExactCache, replay_stream
from .cache.semantic_stage import Embedded
from .formats.base import WireFormat
from .image_fetch import fetch_images
from .limits import RateLimiter, client_ip
from .request import (
    ChoiceDone,
    Completion,
    Event,
    GatewayRequest,
    TextDelta,
    UsageTotal,
    total_usage,
)
from .routing import ROUTE_HEADER, route
from .shaping import Reservation, metered, settle
from .state import GatewayState, for_caller, resolve_target
from .target_options import TargetArgs, target_args
from .upstream import caller_error
from .upstreams.embed_attempts import EmbedExecution
from .upstreams.execute import Execution, HeldRun, Start

__all__ = [
    "PublicCall",
    "check_client",
    "read_body",
    "serve",
    "starter",
    "unless_disconnected",
]

logger = logging.getLogger("sipp.gateway")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_T = TypeVar("_T")


async def serve(state: GatewayState, request: Request, fmt: WireFormat) -> Response:
    """Serve one public request in `fmt`; failures become `fmt`'s error body, never a traceback."""
    call = PublicCall(state, request, fmt.operation)
    try:
        await call.check_client()
        caller = call.authenticate(fmt.credential(request.headers))
        body = await read_body(request, state.config.max_request_bytes)
        req = fmt.decode(body, request.headers, state.config)
        await call.charge(req.cost)
        if req.target in state.config.route_rules:
            req = await route(call, caller, req)
        call.authorize(caller, req.target)
        if req.image_urls:  # only a target that lists the hosts has them fetched
            req = await fetch_images(req, state.target_configs[req.target])
        if req.user is not None or req.metadata is not None:
            _attribute(call, req)
        cache = state.caches.get(req.target)
        if req.operation == "embed":
            if cache is not None:
                await call.look_up(cache, req)  # a bypass: embeddings are not cached
            await call.reserve(req)
            call.admit()
            return call.headed(fmt.encode(req, await call.embed(req), call.request_id))
        args = call.target_args(req)  # a field the target cannot honour: 400, not a 429
        if cache is not None:
            entry = await call.look_up(cache, req)
            if entry is not None:
                return await call.replay(fmt, req, entry)
        await call.reserve(req)
        call.admit()
        execution = call.execute(req, args)
        if not req.stream:
            responses = await call.wait(execution)
            response = fmt.encode(req, Completion(responses), call.request_id)
            if call.cache is not None:  # the answer reached its caller's format: keep it
                call.cache.keep(responses)
            return call.headed(response)
        runs = await unless_disconnected(request, execution.streams())
        frames = call.stream(fmt, req, runs)
        headers = {**fmt.stream_headers, "x-request-id": call.request_id, **execution.headers()}
        if call.cache is not None:
            headers.update(call.cache.headers)
        if call.route is not None:
            headers[ROUTE_HEADER] = call.route
        return StreamingResponse(frames, headers=headers)
    except SippError as exc:
        exc = for_caller(state, call.rec.target, exc)
        call.rec.fail(exc.code)
        return call.headed(fmt.error(exc, call.request_id))
    except Exception:
        logger.exception(
            "unexpected error serving %s request %s", call.rec.operation, call.request_id
        )
        call.rec.fail("execution")
        return fmt.error(ExecutionError("internal error"), call.request_id)
    finally:
        call.close()


def _attribute(call: PublicCall, req: GatewayRequest) -> None:
    """Log who the caller says the request is for (`user`, `metadata`): JSON-quoted, so a
    value cannot forge log lines; never a metrics label, so it cannot grow the series."""
    logger.info(
        "request %s from caller %s for target %s: user=%s metadata=%s",
        call.request_id,
        call.rec.caller,
        json.dumps(req.target),
        json.dumps(req.user),
        json.dumps(req.metadata, sort_keys=True),
    )


class _Run(Protocol):
    @property
    def done(self) -> bool: ...

    def cancel(self, reason: str | None = None) -> None: ...


_R = TypeVar("_R", bound=_Run)


class PublicCall:
    """One public request's record, admission permit and the runs it started."""

    def __init__(self, state: GatewayState, request: Request, operation: str) -> None:
        self.state, self.request = state, request
        given = request.headers.get("x-request-id", "")
        self.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        self.rec = state.record(operation)
        self._permit = False
        self._runs: list[_Run] = []
        self._ip = ""
        self.reservation: Reservation | None = None
        self.execution: Execution | None = None
        self.cache: CacheCall | None = None
        self.looked: CachedEntry | None = None  # what the route stage found in `cache`
        self.replayed = False
        self.route: str | None = None  # the rule that chose the target of a routed name
        self.embedded: Embedded = {}  # question vectors: the route and cache stages share them

    # ------------------------------------------------------------- policy stages
    async def check_client(self) -> None:
        self._ip = await check_client(self.state, self.request)

    def authenticate(self, credential: str | None) -> Caller:
        caller = self.state.tokens.authenticate(credential)
        self.rec.caller = caller.label
        return caller

    async def charge(self, cost: int) -> None:
        """Make this request cost `cost` rate-limit tokens (one per embedding input or per
        choice). The client check took the first; the rest are taken all or none, else 429."""
        limiter = self.state.rate_limiter
        if limiter is None or cost <= 1:
            return
        try:
            if cost > limiter.burst:  # waiting never helps: say so rather than invite retries
                raise RateLimitedError(
                    f"this request costs {cost} rate-limit tokens (one per input or choice), "
                    f"more than the burst ({int(limiter.burst)}); ask for fewer per request"
                )
            if isinstance(limiter, RateLimiter):
                limiter.check(self._ip, cost=cost - 1)
            else:
                await limiter.take(self._ip, cost - 1)
        except RateLimitedError:
            self.state.refused("rate_limited")
            raise

    def authorize(self, caller: Caller, target: str) -> EndpointRef:
        """The endpoint serving `target`, if it exists, is up and the caller may use it."""
        ref = resolve_target(self.state, target)
        self.rec.target = target
        self.state.tokens.authorize(caller, target)
        return ref

    def target_args(self, req: GatewayRequest) -> list[TargetArgs]:
        """Each choice's arguments for its target, or the 400 naming what it cannot do."""
        target = self.state.target_configs[req.target]
        return [target_args(req, target, choice) for choice in range(req.generation.n)]

    async def reserve(self, req: GatewayRequest, tokens: bool = True) -> None:
        """Reserve the request and its estimated tokens (none for a cache hit: `tokens`
        False) on every limit that applies (429 when one cannot cover them); the response
        carries the limits' headers."""
        shaper = self.state.shaper
        if shaper is None or not shaper.applies(self.rec.caller, req.target):
            return
        self.reservation = await shaper.reserve(self.rec.caller, req.target, req, tokens=tokens)
        if self.reservation is not None:
            self.request.state.limit_headers = self.reservation.headers
            if self.reservation.refusal is not None:
                self.state.refused("rate_limited")
                raise self.reservation.refusal

    def admit(self) -> None:
        """Take an admission permit (429 at once when they are all taken)."""
        acquire(self.state)
        self._permit = True

    # ------------------------------------------------------------- cache
    async def look_up(self, cache: ExactCache, req: GatewayRequest) -> CachedEntry | None:
        """The cache stage: this request's stored answer, or None (then it runs, and its
        answer may be stored at settle)."""
        if self.cache is not None and self.cache.cache is cache:
            return self.looked  # a route's cache condition looked already
        caller = self.rec.caller or ""
        self.cache = cache.begin(
            req, caller, self.request.headers, self.request.url.path, self.embedded
        )
        return await self.cache.lookup()

    async def replay(self, fmt: WireFormat, req: GatewayRequest, entry: CachedEntry) -> Response:
        """Answer from the cache: one request against the limits, no tokens, no admission
        permit, no upstream call."""
        await self.reserve(req, tokens=False)
        assert self.cache is not None
        self.cache.served(entry)
        self.replayed = True
        if not req.stream:
            done = Completion(entry.responses)
            return self.headed(fmt.encode(req, done, self.request_id))
        self.rec.stream = True  # the stream settles and finishes the record
        frames = replay_stream(fmt, req, entry, self.rec, self.request_id, self.reservation)
        headers = {**fmt.stream_headers, "x-request-id": self.request_id, **self.cache.headers}
        if self.route is not None:
            headers[ROUTE_HEADER] = self.route
        return StreamingResponse(frames, headers=headers)

    # ------------------------------------------------------------- execute
    def track(self, run: _R) -> _R:
        """A run this request started: `close` cancels it unless it finished or a stream
        took it over, so no failure path leaves a generation or upstream call running."""
        self._runs.append(run)
        return run

    def execute(self, req: GatewayRequest, args: list[TargetArgs]) -> Execution:
        """The execute stage for `req`'s choices: `close` ends whatever it left open."""
        start = starter(self.state.client, req)
        # The primary target's limits go to the attempts; the caller's stay here.
        covered = self.reservation.detach_targets() if self.reservation is not None else None
        self.execution = Execution(self.state, self.rec, req, self.request_id, start, args, covered)
        return self.execution

    async def wait(self, execution: Execution) -> tuple[SippTextResponse, ...]:
        """Every choice's response, or cancel them all if the client hangs up first."""
        t0 = time.perf_counter()
        responses = await unless_disconnected(self.request, execution.responses())
        self.rec.waited = time.perf_counter() - t0
        self.rec.usage(total_usage(responses))
        return responses

    def headed(self, response: Response) -> Response:
        """`response` with the execute stage's attempt headers, once it ran, the cache's
        verdict on a cached target and the rule that routed a routed name."""
        if self.execution is not None:
            response.headers.update(self.execution.headers())
        if self.cache is not None:
            response.headers.update(self.cache.headers)
        if self.route is not None:
            response.headers[ROUTE_HEADER] = self.route
        return response

    async def embed(self, req: GatewayRequest) -> Completion:
        """The execute stage of an embeddings request: its target's pool (retries, never
        fallbacks); `close` ends whatever it left open."""
        t0 = time.perf_counter()
        covered = self.reservation.detach_targets() if self.reservation is not None else None
        execution = EmbedExecution(self.state, self.rec, req, self.request_id, self.track, covered)
        self.execution = execution
        embeddings = await unless_disconnected(self.request, execution.embeddings())
        self.rec.waited = time.perf_counter() - t0
        for embedding in embeddings:
            self.rec.usage(embedding.usage)
        return Completion(embeddings=tuple(embeddings))

    # ------------------------------------------------------------- stream + settle
    def stream(
        self, fmt: WireFormat, req: GatewayRequest, runs: list[HeldRun]
    ) -> AsyncIterator[bytes]:
        """Hand the permit, the record and the execution to the stream, which releases,
        finishes and closes them."""
        assert self.execution is not None
        self._permit = False
        self.rec.stream = True
        return _stream(
            self.state, self.rec, fmt, req, runs, self.execution, self.reservation, self.cache
        )

    def close(self) -> None:
        if not self.rec.stream:
            for run in self._runs:
                if not run.done:
                    run.cancel("the request failed")
            if self.execution is not None:
                self.execution.close()
        if self._permit:
            release(self.state)
        if not self.rec.stream:
            started = bool(self._runs) or bool(self.execution and self.execution.attempts)
            started = started or self.replayed  # a hit was served: it counts as a request
            settle(self.reservation, self.rec, ran=started)
            self.rec.finish()


async def _stream(
    state: GatewayState,
    rec: RequestRecord,
    fmt: WireFormat,
    req: GatewayRequest,
    runs: list[HeldRun],
    execution: Execution,
    reservation: Reservation | None = None,
    cache: CacheCall | None = None,
) -> AsyncIterator[bytes]:
    """`fmt`'s frames for the runs' events. However the stream ends (finished, failed, or
    the client went away), the permit is released, the record settled and finished, and
    any run still going is cancelled; a stream that ran to its end may be cached."""
    failed: str | None = None  # the code of a failure the stream itself reported
    request_id = execution.request_id
    events = _events(state, rec, runs)
    if reservation is not None:
        events = metered(reservation, events)
    if cache is not None:
        events = cache.recording(events)
    try:
        async for frame in fmt.encode_stream(req, events, request_id):
            yield frame
    except SippError as exc:
        failed = exc.code
        yield fmt.stream_error(exc)
    except Exception as exc:
        logger.exception("unexpected error in a %s stream %s", rec.operation, request_id)
        failed = "execution"
        yield fmt.stream_error(ExecutionError(f"internal error: {type(exc).__name__}"))
    finally:
        release(state)
        await _settle(rec, runs, failed)
        settle(reservation, rec, ran=True)
        if cache is not None:
            cache.keep_stream(rec.code is None)
        for run in runs:
            if not run.done:  # the consumer went away: free the slot now, not when collected
                run.cancel("stream consumer went away")
        execution.close()
        rec.finish()


async def _events(
    state: GatewayState, rec: RequestRecord, runs: list[HeldRun]
) -> AsyncIterator[Event]:
    """The runs' output as internal events; failures as the caller may see them."""
    try:
        if len(runs) == 1:
            run = runs[0]
            async for batch in run.joined():
                rec.first_token()
                yield TextDelta(batch)
            response = await run.result()
            yield ChoiceDone(response)
            yield UsageTotal(response.usage)
        else:
            async for event in _merged(rec, runs):
                yield event
    except SippError as exc:
        raise for_caller(state, rec.target, exc) from None


async def _merged(rec: RequestRecord, runs: list[HeldRun]) -> AsyncIterator[Event]:
    """Several choices' events interleaved as they arrive, then their total usage."""
    queue: asyncio.Queue[Event | SippError] = asyncio.Queue()

    async def pump(index: int, run: HeldRun) -> None:
        try:
            async for batch in run.joined():
                queue.put_nowait(TextDelta(batch, index))
            queue.put_nowait(ChoiceDone(await run.result(), index))
        except SippError as exc:
            queue.put_nowait(exc)
        except Exception as exc:  # never leave the merge waiting on a choice that died
            logger.exception("choice %d of a stream failed", index)
            queue.put_nowait(ExecutionError(f"internal error: {type(exc).__name__}"))

    tasks = [asyncio.ensure_future(pump(i, run)) for i, run in enumerate(runs)]
    try:
        responses: list[SippTextResponse] = []
        while len(responses) < len(runs):
            item = await queue.get()
            if isinstance(item, SippError):
                raise item
            if isinstance(item, TextDelta):
                rec.first_token()
            else:
                assert isinstance(item, ChoiceDone)
                responses.append(item.response)
            yield item
        yield UsageTotal(total_usage(responses))
    finally:
        for task in tasks:
            task.cancel()


async def _settle(rec: RequestRecord, runs: list[HeldRun], failed: str | None) -> None:
    """Fill in how a stream ended: the failure it reported (`failed`), else its usage,
    or `client_closed` when the consumer went away before the end."""
    if failed is not None:
        rec.fail(failed)
        return
    if not all(run.done for run in runs):
        rec.fail("client_closed")
        return
    responses = []
    for run in runs:
        try:
            responses.append(await run.result())
        except SippError as exc:
            rec.fail(caller_error(exc).code)
            return
        except Exception:
            rec.fail("execution")
            return
    rec.usage(total_usage(responses))


# ----------------------------------------------------------------- shared helpers
def starter(client: AsyncSippClient, req: GatewayRequest) -> Start:
    """How an attempt of `req` starts its run on an endpoint (`Execution`'s `start`)."""

    def start(ref: EndpointRef, extra: TargetArgs) -> AsyncTextRun:
        common = {
            "endpoint": ref,
            "options": req.options,
            "local": extra.local,
            "provider_options": extra.provider_options,
            "emit_tokens": req.stream,
        }
        if req.operation == "query":
            assert req.prompt is not None
            return client.query(req.prompt, **common)  # type: ignore[arg-type]
        assert req.messages is not None
        return client.chat(req.messages, **common)  # type: ignore[arg-type]

    return start


async def check_client(state: GatewayState, request: Request) -> str:
    """Refuse blocked client addresses (403) and clients over their rate limit (429);
    the client's address otherwise. Only the limit shared through Redis awaits."""
    peer = request.client.host if request.client else None
    ip = client_ip(peer, request.headers, state.config.security)
    if ip in state.blocked_ips:
        raise AuthorizationError("this client address is blocked")
    limiter = state.rate_limiter
    if limiter is not None:
        try:
            if isinstance(limiter, RateLimiter):
                limiter.check(ip)
            else:
                await limiter.take(ip)
        except RateLimitedError:
            state.refused("rate_limited")
            raise
    return ip


async def read_body(request: Request, limit: int, name: str = "max_request_bytes") -> bytes:
    """The body, refused with 413 as soon as more than `limit` bytes are declared or arrive;
    a client that hangs up before it is all sent is `client_closed`, like one that hangs
    up later, not a failure of the gateway."""
    too_large = f"request body exceeds {name} ({limit} bytes)"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(too_large)
    body = bytearray()
    try:
        async for chunk in request.stream():  # counts bytes actually received, chunked too
            body += chunk
            if len(body) > limit:
                raise PayloadTooLargeError(too_large)
    except ClientDisconnect:
        raise ClientClosedError("client disconnected before its request body was read") from None
    return bytes(body)


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


def acquire(state: GatewayState) -> None:
    try:
        state.limit.acquire()
    except SippError:
        state.refused("admission_rejected")
        raise
    state.metrics.in_flight.inc()
    state.activity.in_flight(state.limit.in_flight)


def release(state: GatewayState) -> None:
    state.activity.in_flight(state.limit.in_flight)
    state.limit.release()
    state.metrics.in_flight.dec()
