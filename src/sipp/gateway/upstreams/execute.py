"""The execute stage: run one request's choices on its target's pool, retrying and
falling back until each one commits.

An attempt picks a deployment (see `Pool.pick`) and starts a run there. A failure
before the commit point moves on: the same target again after a backoff with jitter
(a 429's `Retry-After` is honoured up to `retry_after_cap_seconds`; a longer one
takes that deployment out of this request), then the target's `fallbacks` in order,
or its `context_fallbacks` for a prompt over the context. 400/401/403 are final.

The commit point: a non-streaming choice commits with its response. A streaming
choice, when the target has anywhere else to go, is held until its first content
arrives (or `first_token_timeout_seconds` passes); nothing reached the caller
before that, so a failure is still retried. After it, a failure is the stream's
error frame: the caller never gets text spliced from two upstreams.

`Execution.close` is the one cleanup: every attempt still open is ended
(`cancelled`), its run cancelled (closing its upstream connection) and its
deployment's in-flight count given back.

Limits: each choice's first attempt on the primary target runs on the request's
reservation; every other attempt first reserves on its own target's limits (see
`shaping`). A refusal skips that target like an upstream 429 (outcome
`rate_limited`, on to the next fallback). An attempt on a deployment that is another
target also reserves on that target's limits; their refusal skips that deployment
only. An attempt bills its tokens when it ends.

Embeddings and cache verifications run the same loop without `fallbacks`: another
target is another model, whose answer cannot stand in for this one's.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..._descriptors import EndpointRef
from ..._errors import OverloadedError, RateLimitedError, SippError, UnavailableError
from ..._runs import AsyncTextRun
from ..._types import SippTextResponse, TokenBatch
from ..activity import RequestRecord
from ..joined import joined as joined_batches
from ..request import GatewayRequest
from ..shaping import Ledger, Reservation, batch_tokens
from ..state import GatewayState, resolve_target
from ..target_options import TargetArgs, target_args
from ..upstream import HEALTH_FAILURES, failure_kind, from_upstream, log_upstream
from .policy import RetryPolicy
from .pool import DeploymentState, Pool

__all__ = ["Attempt", "Execution", "HeldRun", "deployment_endpoint", "final_error", "wait_to_retry"]

logger = logging.getLogger("sipp.gateway.upstream")
Start = Callable[[EndpointRef, TargetArgs], AsyncTextRun]
_T = TypeVar("_T")
# Runs one attempt on a deployment (its endpoint, the choice's arguments there) and, when
# it succeeds, ends it `ok`; a SippError is the attempt's failure.
Runner = Callable[["Attempt", EndpointRef, TargetArgs], Awaitable[_T]]
_LOCAL_RETRY_AFTER = 1.0  # seconds a caller is told to wait when a local queue is full


class Attempt:
    """One try of one choice on one deployment; `end` settles it exactly once."""

    def __init__(
        self,
        state: GatewayState,
        pool: Pool,
        dep: DeploymentState,
        ledgers: tuple[Ledger, ...] = (),
    ) -> None:
        self.state, self.pool, self.dep = state, pool, dep
        self.run: AsyncTextRun | None = None
        self.outcome: str | None = None
        self.probe = dep.breaker.start()
        self.started = time.perf_counter()
        self._measured = False
        self.ledgers = ledgers  # where its tokens are charged when it ends (limits apply)
        self.used = 0  # input + output tokens its response reported
        self.streamed = 0  # output tokens it streamed
        dep.in_flight += 1

    @property
    def label(self) -> str:
        """`target`, or `target/deployment` for a pool: what `x-sipp-target` shows."""
        return self.pool.name if self.pool.implicit else f"{self.pool.name}/{self.dep.name}"

    def first_output(self) -> None:
        if not self._measured:
            self._measured = True
            self.dep.observe_latency(time.perf_counter() - self.started)

    def count(self, batch: TokenBatch) -> TokenBatch:
        """`batch`, its output tokens counted when limits charge this attempt."""
        if self.ledgers:
            self.streamed += batch_tokens(batch)
        return batch

    def answered(self, response: SippTextResponse) -> None:
        if response.usage is not None:
            self.used = response.usage.input_tokens + response.usage.output_tokens

    def end(self, outcome: str) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        self.dep.in_flight -= 1
        breaker = self.dep.breaker
        if outcome in HEALTH_FAILURES:
            breaker.record(True, self.probe)
        elif outcome in ("cancelled", "unavailable"):
            breaker.abandon(self.probe)
        else:
            breaker.record(False, self.probe)
        self.state.metrics.upstream_attempts.labels(self.pool.name, self.dep.name, outcome).inc()
        if self.run is not None and not self.run.done:
            self.run.cancel("attempt abandoned")
        for ledger in self.ledgers:
            ledger.bill(outcome == "ok", self.used, self.streamed)


class HeldRun:
    """A committed streaming choice: its run, with the first batch already taken off
    it when the stream was held. Iterating it (or `joined()`) settles its attempt."""

    def __init__(
        self,
        run: AsyncTextRun,
        attempt: Attempt,
        first: asyncio.Task[TokenBatch | None] | None = None,
        rest: AsyncIterator[TokenBatch] | None = None,
    ) -> None:
        self.run, self.attempt = run, attempt
        self._first, self._rest = first, rest

    @property
    def done(self) -> bool:
        return self.run.done

    def cancel(self, reason: str | None = None) -> None:
        self.run.cancel(reason)

    async def result(self) -> SippTextResponse:
        return await self.run.result()

    def joined(self) -> AsyncIterator[TokenBatch]:
        """What the gateway streams: these batches, each text batch joined with those
        already queued behind it (`sipp.gateway.joined`)."""
        return joined_batches(aiter(self), lambda: self.run._batch_waiting)

    async def __aiter__(self) -> AsyncIterator[TokenBatch]:
        attempt = self.attempt
        try:
            if self._first is None or self._rest is None:
                async for batch in self.run:
                    attempt.first_output()
                    yield attempt.count(batch)
            else:
                first = await self._first
                if first is not None:
                    attempt.first_output()
                    yield attempt.count(first)
                    async for batch in self._rest:
                        yield attempt.count(batch)
            attempt.answered(await self.run.result())  # ready: the batches ended with it
        except SippError as exc:
            self.attempt.end(failure_kind(exc))
            raise
        finally:
            if self._first is not None and not self._first.done():
                self._first.cancel()
        self.attempt.end("ok")


def _retrieve(task: asyncio.Task[TokenBatch | None]) -> None:
    if not task.cancelled():
        task.exception()


async def _next(batches: AsyncIterator[TokenBatch]) -> TokenBatch | None:
    try:
        return await batches.__anext__()
    except StopAsyncIteration:
        return None


@dataclass(frozen=True, slots=True)
class _Failed:
    """A choice's last failure on a target, and its kind (`cap` when the request's
    attempts ran out)."""

    error: SippError | None
    kind: str


class Execution:
    """One request's attempts over its target, its pool and its fallbacks."""

    def __init__(
        self,
        state: GatewayState,
        rec: RequestRecord,
        req: GatewayRequest,
        request_id: str,
        start: Start,
        args: Sequence[TargetArgs],
        covered: Reservation | None = None,
        fallbacks: bool = True,
    ) -> None:
        """`covered`: the request's reservation on the primary target's limits, which
        each choice's first attempt there runs on. `fallbacks`: False keeps every attempt
        on the primary target's own deployments."""
        self.state, self.rec, self.req, self.request_id = state, rec, req, request_id
        self._start, self._args, self._fallbacks = start, args, fallbacks
        self.primary = req.target
        self.attempts: list[Attempt] = []
        self.answered: list[str] = []
        self._unnoted: tuple[str, SippError] | None = None
        self._closed = False
        self._used = [0] * len(args)  # attempts per choice: each choice has the whole cap
        self._covered = Ledger(covered, len(args)) if covered is not None else None
        self._began = [False] * len(args)  # whether each choice has reserved an attempt

    # ------------------------------------------------------------------ choices
    async def responses(self) -> tuple[SippTextResponse, ...]:
        """Every choice's response (non-streaming)."""
        return tuple(await self._each(lambda choice: self._choice(choice, self._respond)))

    async def streams(self) -> list[HeldRun]:
        """Every choice's committed stream."""
        return await self._each(lambda choice: self._choice(choice, self._commit))

    async def _each(self, one: Callable[[int], Awaitable[_T]]) -> list[_T]:
        n = len(self._args)
        if n == 1:
            return [await one(0)]
        tasks = [asyncio.ensure_future(one(c)) for c in range(n)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:  # one choice failed: the others stop retrying at once
                task.cancel()

    async def _choice(self, choice: int, run: Runner[_T]) -> _T:
        queue = [self.primary]
        visited: set[str] = set()
        last: SippError | None = None
        while queue:
            name = queue.pop(0)
            if name in visited:
                continue
            visited.add(name)
            pool = self.state.pools[name]
            outcome = await self._on_target(pool, choice, run)
            if not isinstance(outcome, _Failed):
                return outcome
            last = outcome.error or last
            res, kind = pool.resilience, outcome.kind
            if kind in ("cap", "4xx", "error") or not self._fallbacks:
                break
            after = res.context_fallbacks if kind == "context" else [*res.fallbacks, *queue]
            queue = list(after)
        raise final_error(self.primary, last)

    async def _on_target(self, pool: Pool, choice: int, run: Runner[_T]) -> _T | _Failed:
        """The choice's result from `pool`, or its last failure there."""
        retry = pool.resilience.retry
        tried: set[str] = set()
        blocked: set[str] = set()  # out of this request: switched off, or asked a long wait
        failures = 0
        last = _Failed(None, "unavailable")
        while failures < retry.attempts:
            if self._used[choice] >= self._max_attempts:
                return _Failed(last.error, "cap")
            dep = pool.pick(tried | blocked)
            if dep.name in blocked:
                break
            try:
                ref, args = self._prepare(pool, dep, choice)
            except SippError as exc:
                logger.info("target %s: deployment %s skipped: %s", pool.name, dep.name, exc)
                blocked.add(dep.name)
                last = _Failed(exc, "unavailable")
                continue
            self._note()
            await self._flush()
            try:
                member = await self._reserve_on(_member(pool, dep))
            except SippError as exc:  # that target's limits: the pool's others may serve
                self._refused(pool, dep, exc)
                blocked.add(dep.name)
                last = _Failed(exc, "rate_limited")
                continue
            try:
                ledger = await self._ledger(pool.name, choice)
            except BaseException as exc:
                if member is not None:
                    member.close()
                if not isinstance(exc, SippError):
                    raise
                self._refused(pool, dep, exc)  # this target takes no further attempt now
                return _Failed(exc, "rate_limited")
            ledgers = tuple(x for x in (ledger, member) if x is not None)
            attempt = Attempt(self.state, pool, dep, ledgers)
            self.attempts.append(attempt)
            self._used[choice] += 1
            tried.add(dep.name)
            try:
                out = await run(attempt, ref, args)
            except SippError as exc:
                kind = failure_kind(exc)
                attempt.end(kind)
                last = _Failed(exc, kind)
                self._unnoted = (pool.name, exc)
                if kind in ("context", "4xx", "error"):
                    return last
                failures += 1
                if kind == "unavailable":
                    blocked.add(dep.name)
                    continue
                if kind not in retry.on:
                    break
                if not await wait_to_retry(retry, kind, exc, failures):
                    blocked.add(dep.name)
                continue
            self.answered.append(attempt.label)
            return out
        return last

    async def _respond(
        self, attempt: Attempt, ref: EndpointRef, args: TargetArgs
    ) -> SippTextResponse:
        attempt.run = self._start(ref, args)
        response = await attempt.run.result()
        attempt.first_output()
        attempt.answered(response)
        attempt.end("ok")
        return response

    async def _ledger(self, target: str, choice: int) -> Ledger | None:
        """Where the next attempt of `choice` on `target` is charged: the request's own
        reservation for the choice's first attempt on the primary target; otherwise a
        new reservation on `target`'s limits."""
        first, self._began[choice] = not self._began[choice], True
        if first and target == self.primary:
            return self._covered
        return await self._reserve_on(target)

    async def _reserve_on(self, target: str | None) -> Ledger | None:
        """A new reservation on `target`'s limits (its 429 raised when they cannot take
        it; none when `target` has no limits, with no store call)."""
        shaper = self.state.shaper
        if target is None or shaper is None or not shaper.limits_target(target):
            return None
        reservation = await shaper.reserve_attempt(target, self.req)
        if reservation is None:
            return None
        if reservation.refusal is not None:
            raise reservation.refusal
        return Ledger(reservation)

    async def _flush(self) -> None:
        """Wait until the settlements of this request's ended attempts reached the store,
        so the next reservation sees what they gave back."""
        pending = [
            task
            for attempt in self.attempts
            for ledger in attempt.ledgers
            if (task := ledger.settling) is not None
        ]
        if pending:
            await asyncio.wait(pending)

    def _refused(self, pool: Pool, dep: DeploymentState, exc: SippError) -> None:
        outcome = "rate_limited" if isinstance(exc, RateLimitedError) else "unavailable"
        self.state.metrics.upstream_attempts.labels(pool.name, dep.name, outcome).inc()

    @property
    def _max_attempts(self) -> int:
        return self.state.pools[self.primary].resilience.max_attempts

    def _prepare(
        self, pool: Pool, dep: DeploymentState, choice: int
    ) -> tuple[EndpointRef, TargetArgs]:
        """The endpoint and arguments of `choice` on `dep` (a 404/503 if it is switched
        off, a 400 if that target cannot honour the request's fields)."""
        name = dep.spec.target or pool.name
        ref = deployment_endpoint(self.state, pool, dep)
        if name == self.primary:
            return ref, self._args[choice]
        return ref, target_args(self.req, self.state.target_configs[name], choice)

    async def _commit(self, attempt: Attempt, ref: EndpointRef, args: TargetArgs) -> HeldRun:
        run = attempt.run = self._start(ref, args)
        if (
            not attempt.pool.resilience.has_alternatives
        ):  # as before pools: commit once the endpoint accepted the run
            if run._preparing:
                await run._accepted()
            if run.done:
                await run.result()
            return HeldRun(run, attempt)
        rest = run.__aiter__()
        first = asyncio.ensure_future(_next(rest))
        # A stream whose consumer leaves before reading it never awaits `first`.
        first.add_done_callback(_retrieve)
        timeout = attempt.pool.resilience.retry.first_token_timeout_seconds
        try:
            await asyncio.wait({first}, timeout=timeout)
        except asyncio.CancelledError:
            first.cancel()
            raise
        if first.done():
            first.result()  # a failure before the first content: raise it, still retryable
        return HeldRun(run, attempt, first, rest)

    def _note(self) -> None:
        """Log and count the failure this request is moving on from (the last failure,
        the one the caller gets, is logged and counted by the pipeline's `for_caller`)."""
        if self._unnoted is None:
            return
        target, exc = self._unnoted
        self._unnoted = None
        if from_upstream(exc):
            status = str(exc.status) if exc.status is not None else exc.code
            self.state.metrics.upstream_errors.labels(target, status).inc()
            log_upstream(target, exc, self.state.secrets)

    # ------------------------------------------------------------------ cleanup
    def headers(self) -> dict[str, str]:
        """`x-sipp-target` (who answered) and `x-sipp-attempts` (how many tries it took)."""
        out = {"x-sipp-attempts": str(len(self.attempts))}
        if self.answered:
            out["x-sipp-target"] = ", ".join(dict.fromkeys(self.answered))
        return out

    def close(self) -> None:
        """End every attempt still open (cancelling its run); record and log the tries."""
        if self._closed:
            return
        self._closed = True
        for attempt in self.attempts:
            attempt.end("cancelled")
        if self._covered is not None:
            self._covered.close()
        self.rec.attempts = len(self.attempts)
        self.rec.answered_by = ", ".join(dict.fromkeys(self.answered)) or None
        if len(self.attempts) > 1 or any(a.outcome != "ok" for a in self.attempts):
            logger.info(
                "request %s for target %s: %d attempt(s): %s",
                self.request_id,
                self.primary,
                len(self.attempts),
                ", ".join(f"{a.label}={a.outcome}" for a in self.attempts),
            )


def _member(pool: Pool, dep: DeploymentState) -> str | None:
    """The other target `dep` runs on, when it is one (its limits apply too)."""
    target = dep.spec.target
    return target if target is not None and target != pool.name else None


def deployment_endpoint(state: GatewayState, pool: Pool, dep: DeploymentState) -> EndpointRef:
    """The endpoint an attempt on `dep` goes to (a 404/503 if its target is switched off)."""
    ref = resolve_target(state, dep.spec.target or pool.name)
    return dep.ref if dep.ref is not None else ref


async def wait_to_retry(retry: RetryPolicy, kind: str, exc: SippError, failures: int) -> bool:
    """Wait out the backoff after a target's `failures`-th failed attempt (of `kind`);
    False, at once, when the deployment asked for a longer wait than the cap (then it is
    out of this request)."""
    delay = _backoff(retry.backoff_base_seconds, retry.backoff_cap_seconds, failures)
    if kind == "429" and exc.retry_after is not None:
        if exc.retry_after > retry.retry_after_cap_seconds:
            return False
        delay = max(delay, exc.retry_after)
    if failures < retry.attempts and delay > 0:
        await asyncio.sleep(delay)
    return True


def final_error(target: str, last: SippError | None) -> SippError:
    """The failure a request on `target` ends with once nothing is left to try."""
    if last is None:
        last = UnavailableError(f"target {target!r} has no deployment to try")
    if isinstance(last, OverloadedError) and last.retry_after is None:
        last.retry_after = _LOCAL_RETRY_AFTER
    return last


def _backoff(base: float, cap: float, failures: int) -> float:
    """Exponential backoff with jitter: between half and all of base * 2^(failures-1)."""
    ceiling = min(cap, base * 2.0 ** (failures - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)
