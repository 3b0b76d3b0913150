"""Online verification: a sampled fraction of cache hits also goes upstream, after the
hit was answered, and the fresh answer is compared with the cached one.

    hit served -> sampled? (every 1/verify_fraction-th hit, by a counter) -> busy? skipped
               -> upstream in the background (no caller waits, none is charged)
               -> same normalized text: agree; else, with an embedding target, the guard
                  (negations, numbers, antonyms) passing and the cosine of the two
                  answers' embeddings >= verify_threshold: agree; else disagree
               -> failures: error

The counts are exported as `sipp_gateway_cache_verifications_total{target,match,outcome}`
and the measured false-hit rate, disagree / (agree + disagree), as a gauge per target and
match kind. A verification never stores into the cache and never touches the caller's
response. A `disagree` on a semantic hit removes the matched entry's vector from the
semantic index (the entry still answers its own question exactly, but no paraphrase
reaches it any more); a `disagree` on an exact hit only counts (for a greedy request it
means the target answers differently now; the TTL retires the entry).

A verification is the target's own traffic, on the target's own terms: it takes an
admission permit and reserves on the target's `[targets.limits]` (never on the caller's),
runs through the target's pool like any request (each retry reserving again, each attempt
settled with its real usage) but never to its fallbacks (another target's answer says
nothing about this one's cache, and would be a paid call thrown away). It
is best effort and never waits: it is `skipped` while another verification of the same
target runs, when taking a permit would leave none free for callers, when the target's
limits would refuse it, when a local target has no idle slot (it would queue ahead of
callers), or when the target is disabled, loading or failed. Shutdown cancels the ones in
flight, freeing their permits and runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import unicodedata
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..._errors import SippError
from ..._types import SippTextResponse, ToolCall
from ..background import stop_loop
from ..request import GatewayRequest, total_usage
from .entry import CachedEntry
from .guard import guard_rejects

if TYPE_CHECKING:
    from ..._descriptors import EndpointRef
    from ..activity import RequestRecord
    from ..metrics import GatewayMetrics
    from ..state import GatewayState
    from .semantic_stage import Embedder, SemanticStage, Vector

__all__ = ["MAX_RUNNING", "Upstream", "Verifier", "answer_text", "target_upstream"]

logger = logging.getLogger("sipp.gateway")
# A fresh answer for a request, or None when the target is too busy to ask now.
Upstream = Callable[[GatewayRequest], Awaitable["tuple[SippTextResponse, ...] | None"]]
MAX_RUNNING = 1  # verifications of one target at a time: sampling, not load


class Verifier:
    """One target's sampler, its verifications in flight and their counts."""

    def __init__(
        self,
        target: str,
        fraction: float,
        threshold: float,
        metrics: GatewayMetrics,
        upstream: Upstream,
        embed: Embedder | None = None,
        semantic: SemanticStage | None = None,
    ) -> None:
        self.target, self.fraction, self.threshold = target, fraction, threshold
        self.metrics, self._upstream, self._embed = metrics, upstream, embed
        self._semantic = semantic
        self._hits = 0
        self._running: set[asyncio.Task[None]] = set()
        self._judged = {match: [0, 0] for match in ("exact", "semantic")}  # agree, disagree

    def offer(self, req: GatewayRequest, entry: CachedEntry, match: str, key: str) -> None:
        """A hit was answered from `entry` (stored under `key`): verify it if sampled."""
        self._hits += 1
        # exactly floor(hits * fraction) of the first `hits` hits, spread evenly
        if math.floor(self._hits * self.fraction) == math.floor((self._hits - 1) * self.fraction):
            return
        if len(self._running) >= MAX_RUNNING:
            self._count(match, "skipped")
            return
        fresh = dataclasses.replace(req, stream=False, include_usage=False)
        task = asyncio.ensure_future(self._verify(fresh, entry, match, key))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _verify(self, req: GatewayRequest, entry: CachedEntry, match: str, key: str) -> None:
        try:
            fresh = await self._upstream(req)
            outcome = "skipped" if fresh is None else await self._compare(entry.responses, fresh)
        except SippError as exc:
            logger.info("cache verification for target %s failed (%s)", self.target, exc.code)
            outcome = "error"
        except Exception:  # a bug must not kill the loop's task silently
            logger.exception("cache verification for target %s failed", self.target)
            outcome = "error"
        self._count(match, outcome)
        if outcome == "disagree" and match == "semantic" and self._semantic is not None:
            self._semantic.remove(key)

    async def _compare(
        self, cached: Sequence[SippTextResponse], fresh: Sequence[SippTextResponse]
    ) -> str:
        if len(cached) != len(fresh):
            return "disagree"
        for old, new in zip(cached, fresh, strict=True):
            a, b = answer_text(old), answer_text(new)
            if a == b:
                continue
            if self._embed is None or not a or not b:
                return "disagree"
            # the embeddings miss what the guard catches ("at 3 pm" / "at 4 pm": 0.96)
            guarded = self._semantic is not None and self._semantic.settings.guard
            if guarded and guard_rejects(a, b) is not None:
                return "disagree"
            if _cosine(await self._embed(a), await self._embed(b)) < self.threshold:
                return "disagree"
        return "agree"

    def _count(self, match: str, outcome: str) -> None:
        self.metrics.cache_verifications.labels(self.target, match, outcome).inc()
        if outcome in ("agree", "disagree"):
            judged = self._judged[match]
            judged[outcome == "disagree"] += 1
            rate = judged[1] / (judged[0] + judged[1])
            self.metrics.cache_false_hit_rate.labels(self.target, match).set(rate)

    async def close(self) -> None:
        """Cancel the verifications in flight and wait until they let go of everything."""
        while self._running:
            await asyncio.gather(*(stop_loop(task) for task in list(self._running)))


def answer_text(response: SippTextResponse) -> str:
    """What an answer says, for comparing: its text with runs of whitespace made one space
    (and Unicode composed), then each tool call with its arguments as canonical JSON."""
    text = " ".join(unicodedata.normalize("NFC", response.text).split())
    return "\n".join([text, *map(_call_text, response.tool_calls)])


def _call_text(call: ToolCall) -> str:
    try:
        arguments = json.dumps(json.loads(call.arguments), sort_keys=True, separators=(",", ":"))
    except ValueError:
        arguments = call.arguments
    return f"{call.name}({arguments})"


def _cosine(a: Vector, b: Vector) -> float:
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b)) / norms if norms else 0.0


# ------------------------------------------------------------------ the target's side
def target_upstream(state: GatewayState, target: str) -> Upstream:
    """Ask `target` for a fresh answer on its own admission and limits (see the module's
    docstring); None when it is too busy to ask without getting in a caller's way."""
    from ..activity import RequestRecord
    from ..call import starter
    from ..state import resolve_target
    from ..target_options import target_args
    from ..upstreams.execute import Execution

    config = state.target_configs[target]

    async def ask(req: GatewayRequest) -> tuple[SippTextResponse, ...] | None:
        try:
            ref = resolve_target(state, target)
        except SippError:  # disabled, loading or failed: no answer to compare with now
            return None
        if not _spare_permit(state) or not _idle(state, config.type, ref):
            return None
        args = [target_args(req, config, choice) for choice in range(req.generation.n)]
        rec = RequestRecord("verify", _unrecorded, target=target)
        reservation = None
        shaper = state.shaper
        if shaper is not None and shaper.applies(None, target):
            try:
                reservation = await shaper.reserve(None, target, req)
            except SippError:  # the state store is down and the target's limits fail closed
                return None
            if reservation is not None and reservation.refusal is not None:
                return None
            if not _spare_permit(state):  # taken while the store answered
                if reservation is not None:
                    reservation.cancel()
                return None
        state.limit.acquire()
        request_id = f"verify-{uuid.uuid4().hex}"
        # the attempts settle the reservation, each with what it used (a retry its own)
        covered = reservation.detach_targets() if reservation is not None else None
        start = starter(state.client, req)
        execution = Execution(state, rec, req, request_id, start, args, covered, fallbacks=False)
        try:
            responses = await execution.responses()
            rec.usage(total_usage(responses))
        except asyncio.CancelledError:
            rec.fail("client_closed")
            raise
        except SippError as exc:
            rec.fail(exc.code)
            raise
        finally:
            execution.close()
            state.limit.release()
        return responses

    return ask


def _spare_permit(state: GatewayState) -> bool:
    """Whether an admission permit is free and another one stays free for callers."""
    limit = state.limit
    return limit.limit is None or limit.in_flight + 1 < limit.limit


def _idle(state: GatewayState, kind: str, ref: EndpointRef) -> bool:
    """A local target with a free slot and nothing queued (a provider has no queue here)."""
    if kind != "local":
        return True
    try:
        stats = state.client.runtime_metrics(ref)
    except SippError:
        return False
    return not stats.get("queue_depth", 0) and stats.get("busy_slots", 0) < stats.get("slots", 1)


def _unrecorded(record: RequestRecord) -> None:
    """A verification is no public request: it stays out of the request metrics."""
