"""Token-aware limits: reserve before a request runs, settle with what it really used.

Every limit that applies to a request (its caller label's and its target's
`requests_per_minute`, `tokens_per_minute`, `tokens_per_day`) is reserved in one
atomic step of the state store, so concurrent requests, on one replica or several,
cannot together pass a limit. The token reservation is an estimate:

    input  = the exact prompt token count when the target is local (its tokenizer),
             else ceil(UTF-8 bytes / 4) of every prompt, message and tool definition
             plus 4 per message and 3 per conversation
    output = max_tokens (or [limits].reserve_output_tokens when absent) times n

A target holds n times (input + one choice's output): each choice is its own call there,
with its prompt. The caller holds input + output once (it receives the prompt once).

When the request ends, the token buckets are settled with the real usage (a refund
or a further charge); a stream cut short is charged what was streamed, and the
prompt's estimate once anything was. A request refused before it ran gives
everything back, its request count too.

Retries and fallbacks: the request's reservation covers each choice's first attempt
on its target, and that choice's share of it is settled as soon as the attempt ends (so
a retry there never competes with its own failed attempt's estimate). Every further
attempt (a retry on the same target, or a fallback to another) reserves again on its
own target's limits: one request and the estimate of one choice, counted exactly by a
local target's tokenizer. An attempt on a pool deployment that is another target also
reserves on that target's limits (its requests, its budget). A target is settled per
attempt with what that attempt used (its reported usage; what it streamed when it
failed, so a connect error costs nothing but its request). The caller's own limits are
reserved once per request, not per attempt, and charged what the caller received: the
usage of the attempts that served it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._errors import InvalidConfigError, RateLimitedError, UnavailableError
from .._types import TokenBatch
from .activity import RequestRecord
from .auth import read_secret
from .config import GatewayConfig, LimitConfig
from .metrics import GatewayMetrics
from .request import Event, GatewayRequest, TextDelta
from .store import Bucket, Grant, Store, StoreUnavailable

if TYPE_CHECKING:
    from ..local.endpoint import LocalEndpoint

__all__ = [
    "RATE_LIMIT_HEADERS",
    "Ledger",
    "Reservation",
    "Shaper",
    "batch_tokens",
    "build_shaper",
    "estimate_input",
    "estimate_text",
    "metered",
    "open_store",
    "rate_limit_headers",
    "settle",
    "store_unavailable",
]

logger = logging.getLogger("sipp.gateway")

MINUTE_MS, DAY_MS = 60_000, 86_400_000
RATE_LIMIT_HEADERS = tuple(
    f"x-ratelimit-{what}-{unit}"
    for unit in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
)
MESSAGE_OVERHEAD, CONVERSATION_OVERHEAD = 4, 3  # role and separators, as OpenAI counts them


def estimate_text(text: str) -> int:
    """A remote target's token count for `text`: UTF-8 bytes / 4, rounded up."""
    return -(-len(text.encode("utf-8")) // 4)


def estimate_input(req: GatewayRequest) -> int:
    """The documented estimate of a request's input tokens (see the module's docstring)."""
    if req.inputs:
        return sum(estimate_text(text) for text in req.inputs)
    total = estimate_text(req.prompt) if req.prompt is not None else 0
    if req.messages is not None:
        total += CONVERSATION_OVERHEAD
        for message in req.messages:
            total += MESSAGE_OVERHEAD + estimate_text(message.content)
            for call in message.tool_calls:
                total += estimate_text(call.name) + estimate_text(call.arguments)
    for tool in req.options.tools or ():
        schema = json.dumps(tool.parameters) if tool.parameters is not None else ""
        total += estimate_text(tool.name) + estimate_text(tool.description or "")
        total += estimate_text(schema)
    return total


@dataclass(frozen=True, slots=True)
class _Limit:
    """One configured limit as a bucket, with what it counts and whose it is."""

    bucket: Bucket
    tokens: bool  # counts tokens (else requests)
    scope: str  # caller or target
    name: str  # requests_per_minute, tokens_per_minute or tokens_per_day
    fail_closed: bool


class Shaper:
    """The limits of a configuration, over one state store."""

    def __init__(self, config: GatewayConfig, store: Store, metrics: GatewayMetrics) -> None:
        self.store, self.metrics = store, metrics
        self.reserve_output = config.reserve_output_tokens
        prefix, default = config.state.key_prefix, config.state.on_unavailable
        self._callers = {
            t.caller: self._limits(f"{prefix}:caller:{t.caller}", "caller", t.limits, default)
            for t in config.tokens
            if t.limits is not None
        }
        self._targets = {
            t.name: self._limits(f"{prefix}:target:{t.name}", "target", t.limits, default)
            for t in config.targets
            if t.limits is not None
        }
        self.fail_closed = any(limit.fail_closed for group in self._groups() for limit in group)
        self._settling: set[asyncio.Future[Any]] = set()
        # local targets' endpoints by target name (serve adds them as they load), whose
        # tokenizer counts a prompt exactly
        self.local: dict[str, LocalEndpoint] = {}

    def _groups(self) -> Iterable[tuple[_Limit, ...]]:
        return [*self._callers.values(), *self._targets.values()]

    @staticmethod
    def _limits(key: str, scope: str, config: LimitConfig, default: str) -> tuple[_Limit, ...]:
        closed = (config.on_unavailable or default) == "fail_closed"
        out = []
        for name, value, period, window, tokens in (
            ("requests_per_minute", config.requests_per_minute, MINUTE_MS, False, False),
            ("tokens_per_minute", config.tokens_per_minute, MINUTE_MS, False, True),
            ("tokens_per_day", config.tokens_per_day, DAY_MS, True, True),
        ):
            if value is not None:
                bucket = Bucket(f"{key}:{name}", value, period, window)
                out.append(_Limit(bucket, tokens, scope, name, closed))
        return tuple(out)

    async def usage(self) -> list[dict[str, Any]]:
        """Every configured limit of every caller label and target with its level now,
        read from the store without charging anything (`StoreUnavailable` when it cannot
        be reached). `used` is what the bucket is short of full (above the capacity while
        a settlement left it in debt)."""
        owned = [
            (owner, limit)
            for group in (self._callers, self._targets)
            for owner, limits in group.items()
            for limit in limits
        ]
        if not owned:
            return []
        levels = await self.store.peek([limit.bucket for _, limit in owned])
        return [
            {
                "scope": limit.scope,
                "name": owner,
                "limit": limit.name,
                "capacity": limit.bucket.capacity,
                "used": max(0, round(limit.bucket.capacity - level.remaining)),
                "remaining": max(0, math.floor(level.remaining)),
                "reset_seconds": round(level.reset_s, 1),
            }
            for (owner, limit), level in zip(owned, levels, strict=True)
        ]

    async def available(self) -> bool:
        """Whether the state store answers now (the readiness route asks)."""
        up = await self.store.ping()
        self.metrics.state_available.set(int(up))
        return up

    def applies(self, caller: str | None, target: str) -> bool:
        """Whether any limit covers this request: two dict lookups, no store call."""
        return (caller is not None and caller in self._callers) or target in self._targets

    def limits_target(self, target: str) -> bool:
        """Whether `target` has limits of its own (an attempt there reserves again)."""
        return target in self._targets

    async def reserve(
        self, caller: str | None, target: str, req: GatewayRequest, *, tokens: bool = True
    ) -> Reservation | None:
        """Reserve one request and its estimated tokens (none when `tokens` is False: a
        cache hit) on every limit that applies; when one cannot cover it, the reservation
        carries the 429 (with Retry-After) to raise.
        None when no limit applies, or the store is unreachable and every limit involved
        fails open (503 when one fails closed)."""
        limits = (*self._callers.get(caller or "", ()), *self._targets.get(target, ()))
        return await self._reserve(limits, target, req, tokens, req.generation.n)

    async def reserve_attempt(self, target: str, req: GatewayRequest) -> Reservation | None:
        """Reserve a retry's or a fallback's attempt on `target`'s own limits: one request
        and one choice's estimated tokens (the caller's limits were reserved once, for the
        whole request). As `reserve`: a refusal rides on the reservation, None when
        `target` has no limits or the store is away and they fail open."""
        work = self._reserve(self._targets.get(target, ()), target, req, True, 1)
        task = asyncio.ensure_future(work)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The request went away (another choice failed, the client left) while the
            # store was taking it: give it back once the store has answered.
            self._settling.add(task)
            task.add_done_callback(_give_back)
            task.add_done_callback(self._settling.discard)
            raise

    async def _reserve(
        self,
        limits: tuple[_Limit, ...],
        target: str,
        req: GatewayRequest,
        tokens: bool,
        choices: int,
    ) -> Reservation | None:
        if not limits:
            return None
        input_tokens = None if tokens else 0
        if input_tokens is None and target in self.local and any(x.tokens for x in limits):
            from .prompt_count import local_prompt_tokens

            input_tokens = await local_prompt_tokens(self.local[target], req)
        if input_tokens is None:
            input_tokens = estimate_input(req)
        reserved = per_choice = input_tokens
        if req.operation != "embed" and tokens:
            output = req.options.max_tokens or self.reserve_output
            reserved += output * choices
            per_choice += output
        amounts = [
            (per_choice * choices if limit.scope == "target" else reserved) if limit.tokens else 1
            for limit in limits
        ]
        try:
            grant = await self.store.reserve([limit.bucket for limit in limits], amounts)
        except StoreUnavailable:
            store_unavailable(self.metrics, any(limit.fail_closed for limit in limits))
            return None
        self.metrics.state_available.set(1)
        held = [amount if limit.tokens else 0 for limit, amount in zip(limits, amounts)]
        reservation = Reservation(self, limits, reserved, input_tokens, grant, per_choice, held)
        if not grant.ok:
            reservation.refusal = self._refusal(limits, amounts, grant)
        return reservation

    def _refusal(
        self, limits: tuple[_Limit, ...], amounts: list[int], grant: Grant
    ) -> RateLimitedError:
        short = [
            limit
            for limit, amount, level in zip(limits, amounts, grant.levels, strict=True)
            if amount > level.remaining
        ] or list(limits)
        for limit in short:
            self.metrics.limit_refused.labels(limit.scope, limit.name).inc()
        first = short[0]
        what = "requests" if not first.tokens else "tokens"
        if grant.retry_after is None:
            error = RateLimitedError(
                f"this request needs more {what} than the {first.scope}'s "
                f"{first.name} ({first.bucket.capacity}) allows; ask for fewer (max_tokens)"
            )
        else:
            error = RateLimitedError(
                f"the {first.scope}'s {first.name} ({first.bucket.capacity}) is used up; "
                "retry later"
            )
            error.retry_after = max(1, math.ceil(grant.retry_after))
        return error

    def adjust(
        self, limits: Iterable[_Limit], deltas: Iterable[int]
    ) -> asyncio.Future[None] | None:
        """Apply a settlement in the background: the response does not wait for it (a
        retry that reserves on the same limits does: the returned task)."""
        pairs = [(limit.bucket, delta) for limit, delta in zip(limits, deltas) if delta]
        if not pairs:
            return None
        buckets, amounts = zip(*pairs, strict=True)
        return self._spawn(self._adjust(list(buckets), list(amounts)))

    async def _adjust(self, buckets: list[Bucket], deltas: list[int]) -> None:
        try:
            await self.store.adjust(buckets, deltas)
        except StoreUnavailable:  # a lost settlement: the reservation stands as charged
            store_unavailable(self.metrics, fail_closed=False)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(work)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def settled(self) -> None:
        """Wait for the settlements under way (shutdown, tests)."""
        while self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)


def store_unavailable(metrics: GatewayMetrics, fail_closed: bool) -> None:
    """Count a state-store operation that could not reach the store, then apply the
    policy of the limits it was for: 503 (retry in a second) when one fails closed, else
    return and let the request through without them (fail open)."""
    metrics.state_errors.inc()
    metrics.state_available.set(0)
    if fail_closed:
        error = UnavailableError("rate limits cannot be checked right now; retry later")
        error.retry_after = 1
        raise error from None


def _give_back(task: asyncio.Future[Reservation | None]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    reservation = task.result()
    if reservation is not None:
        reservation.cancel()


def open_store(config: GatewayConfig, env: Mapping[str, str]) -> Store | None:
    """The configured state store: Redis when `[state]` says so (limits and runtime
    controls then live there), this process's memory when a limit needs counting, else
    None, so a gateway without either never opens a connection nor pays for one."""
    if config.state.backend == "redis":
        assert config.state.url_env is not None  # the parser requires it
        url = read_secret(env, config.state.url_env, "state.url_env")
        try:
            from .store.redis import RedisStore  # the redis client is only needed here
        except ImportError:
            raise InvalidConfigError(
                'state.backend = "redis" needs the redis client: pip install "sipppy[redis]"'
            ) from None
        try:
            return RedisStore(url)
        except ValueError:  # the message would quote the URL, which may hold a password
            raise InvalidConfigError(
                f"state.url_env: {config.state.url_env} does not hold a redis://, rediss:// "
                "or unix:// URL"
            ) from None
    if not _limited(config):
        return None
    from .store.memory import MemoryStore

    return MemoryStore()


def _limited(config: GatewayConfig) -> bool:
    return any(t.limits for t in config.tokens) or any(t.limits for t in config.targets)


def build_shaper(
    config: GatewayConfig, store: Store | None, metrics: GatewayMetrics
) -> Shaper | None:
    """The configuration's limits over `store`; None when nothing is limited."""
    if store is None or not _limited(config):
        return None
    return Shaper(config, store, metrics)


def settle(reservation: Reservation | None, rec: RequestRecord, ran: bool) -> None:
    """Settle a finished request's reservation from its record: the real usage when the
    target reported it; the estimate when it succeeded without usage; what was streamed
    when it failed; everything back when it never ran."""
    if reservation is None:
        return
    if not ran:
        reservation.cancel()
        return
    used = rec.input_tokens + rec.output_tokens
    if used:
        reservation.settle(used)
    elif rec.code is None:
        reservation.settle(reservation.tokens)
    else:
        reservation.settle_cut()


def batch_tokens(batch: TokenBatch) -> int:
    """The output tokens a streamed batch holds (a remote delta's token ids are unknown:
    its text's estimate then)."""
    return len(batch.token_ids) or estimate_text(batch.text)


async def metered(reservation: Reservation, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """`events`, counting the output tokens they deliver."""
    async for event in events:
        if isinstance(event, TextDelta):
            reservation.streamed += batch_tokens(event.batch)
        yield event


class Ledger:
    """Where attempts' token charges go. A retry's or a fallback's own reservation is
    settled as soon as its attempt ends. The request's reservation on its primary target
    holds one share per choice (`shares`): each choice's first attempt there settles its
    share as soon as it ends, so a retry of that choice never competes with its estimate;
    `close` gives back the shares of choices that never ran there (everything, its request
    count too, when none did)."""

    def __init__(self, reservation: Reservation, shares: int = 1) -> None:
        self.reservation, self._shares = reservation, shares

    def bill(self, ok: bool, used: int, streamed: int) -> None:
        """An attempt ended: `ok` or not, with `used` tokens reported, `streamed` seen."""
        reservation = self.reservation
        charge = reservation.charge(ok, used, streamed)
        self._shares -= 1
        if self._shares > 0:
            reservation.settle_share(charge)
        else:  # the last share: whatever is still held goes with it
            reservation.settle(charge)

    def close(self) -> None:
        if self.reservation.ran:
            self.reservation.settle(0)
        else:
            self.reservation.cancel()

    @property
    def settling(self) -> asyncio.Future[None] | None:
        """Its latest settlement, while the store is still taking it."""
        task = self.reservation.adjusting
        return task if task is not None and not task.done() else None


class Reservation:
    """What one request reserved; `settle` or `cancel` it exactly once (`settle_share`
    before that, any number of times)."""

    def __init__(
        self,
        shaper: Shaper,
        limits: tuple[_Limit, ...],
        tokens: int,
        input_tokens: int,
        grant: Grant,
        choice_tokens: int | None = None,
        held: list[int] | None = None,
    ) -> None:
        self.shaper, self.limits, self.tokens = shaper, limits, tokens
        self.input_tokens = input_tokens
        self.choice_tokens = tokens if choice_tokens is None else choice_tokens
        # tokens still held on each limit (0 on a request limit): a target holds n choices
        self.held = held if held is not None else [tokens if x.tokens else 0 for x in limits]
        self.granted = grant.ok
        self.headers = rate_limit_headers(limits, grant)
        self.refusal: RateLimitedError | None = None
        self.streamed = 0  # output tokens a stream delivered (its charge if cut short)
        self.ran = False  # a share was settled: the request count stays whatever follows
        self.adjusting: asyncio.Future[None] | None = None  # its latest settlement
        self._done = not grant.ok  # a refused reservation took nothing

    def settle(self, used: int) -> None:
        """Charge `used` tokens instead of what is still held; the request stays counted."""
        if self._done:
            return
        self._done = True
        self._adjust([used - held if limit.tokens else 0 for limit, held in self._each()])

    def settle_share(self, used: int) -> None:
        """Charge `used` tokens instead of one choice's share, holding the others'."""
        if self._done:
            return
        self.ran = True
        share = self.choice_tokens
        self._adjust([used - share if limit.tokens else 0 for limit in self.limits])
        self.held = [max(0, held - share) for held in self.held]

    def cancel(self) -> None:
        """The request never ran: give back its tokens and its request count."""
        if self._done:
            return
        self._done = True
        self._adjust([-held if limit.tokens else -1 for limit, held in self._each()])

    def _each(self) -> zip[tuple[_Limit, int]]:
        return zip(self.limits, self.held, strict=True)

    def _adjust(self, deltas: list[int]) -> None:
        self.adjusting = self.shaper.adjust(self.limits, deltas) or self.adjusting

    def settle_cut(self) -> None:
        """A run that ended without usage: charge what was streamed (and the prompt's
        estimate once anything was)."""
        self.settle(self.streamed + self.input_tokens if self.streamed else 0)

    def detach_targets(self) -> Reservation | None:
        """Split the target's limits off into a reservation of their own, which the
        execute stage settles with what the attempts there used; this one keeps the
        caller's limits (and the headers of them all, as they were granted)."""
        if self._done:
            return None
        pairs = list(self._each())
        mine = [pair for pair in pairs if pair[0].scope == "caller"]
        theirs = [pair for pair in pairs if pair[0].scope != "caller"]
        if not theirs:
            return None
        self.limits, self.held = tuple(x for x, _ in mine), [held for _, held in mine]
        part = copy.copy(self)
        part.limits, part.held = tuple(x for x, _ in theirs), [held for _, held in theirs]
        return part

    def charge(self, ok: bool, used: int, streamed: int) -> int:
        """What one attempt under this reservation costs in tokens: its reported usage
        (`used`); without one, a choice's estimate when it succeeded, else what it
        streamed and the prompt's estimate once anything was (a connect error: 0)."""
        if used:
            return used
        if ok:
            return self.choice_tokens
        return streamed + self.input_tokens if streamed else 0


def rate_limit_headers(limits: tuple[_Limit, ...], grant: Grant) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers for the tightest request limit and token limit."""
    headers: dict[str, str] = {}
    for tokens, suffix in ((False, "requests"), (True, "tokens")):
        pairs = [
            pair for pair in zip(limits, grant.levels, strict=True) if pair[0].tokens == tokens
        ]
        if not pairs:
            continue
        limit, level = min(pairs, key=lambda pair: pair[1].remaining)
        headers[f"x-ratelimit-limit-{suffix}"] = str(limit.bucket.capacity)
        headers[f"x-ratelimit-remaining-{suffix}"] = str(max(0, math.floor(level.remaining)))
        headers[f"x-ratelimit-reset-{suffix}"] = duration(level.reset_s)
    return headers


def duration(seconds: float) -> str:
    """Seconds the way OpenAI's reset headers write them: 20ms, 1s, 6m0s, 1h2m3s."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    return f"{minutes}m{secs}" if minutes else secs
