"""The exact cache as a pipeline stage: look up after authorize, replay a hit, store at settle.

    authorize -> [cache: begin + lookup] -> hit: reserve (one request, no tokens) -> replay
                                         -> miss/bypass: reserve -> admit -> execute
                                            -> settle: keep (complete 2xx, finish allowed)

`begin` decides without waiting: a target without `[targets.cache]` never gets here
(one dict lookup in the pipeline), and a request the cache must not answer (sampled
without `cache_sampled`, `Cache-Control: no-cache`) is a `bypass` without a store
call. A hit replays the stored answer as the events a live run produces, so every
wire format streams it (token frames, tool calls, finish reason, usage) unchanged.
Storing happens in the background once the answer is complete: a failed, cut,
cancelled or abandoned answer, or one whose finish reason the target does not keep,
is never stored. A store that fails is logged and counted; the request is served
uncached.

With `semantic = true` (semantic_stage.py), an exact miss embeds the last user message
and searches its partition (`keys.partition_key`) for a stored question close enough in
meaning; the entry found is read by its exact key and replayed like an exact hit
(`x-sipp-cache-match: semantic`). Storing writes the question's vector with the entry
(reusing the lookup's embedding), then indexes it. A failed embedding serves the request
uncached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from ..._errors import ExecutionError, SippError
from ..._types import SippTextResponse, TokenBatch
from ..request import ChoiceDone, Event, GatewayRequest, TextDelta
from .config import CacheConfig
from .entry import CachedChoice, CachedEntry, decode_entry, encode_entry, replay_events
from .keys import SHARED_SCOPE, exact_key, last_user_text, partition_key
from .semantic_stage import Embedded, EmbeddingFailed
from .store import CacheStore, CacheStoreError, Totals

if TYPE_CHECKING:
    from ..activity import RequestRecord
    from ..formats.base import WireFormat
    from ..metrics import GatewayMetrics
    from ..shaping import Reservation
    from .semantic_stage import SemanticStage, Vector
    from .verify import Verifier

__all__ = ["CACHE_HEADER", "MATCH_HEADER", "CacheCall", "ExactCache", "replay_stream"]

logger = logging.getLogger("sipp.gateway")
CACHE_HEADER = "x-sipp-cache"
MATCH_HEADER = "x-sipp-cache-match"  # on a hit: "exact" or "semantic"
# A question for the semantic index: partition, last user message, its vector (None: not
# embedded yet).
Question = tuple[str, str, "Vector | None"]


class ExactCache:
    """One target's exact cache: its settings, its store and its background writes."""

    def __init__(
        self, target: str, config: CacheConfig, store: CacheStore, metrics: GatewayMetrics
    ) -> None:
        self.target, self.config, self.store, self.metrics = target, config, store, metrics
        self.semantic: SemanticStage | None = None  # set when `semantic = true`
        self.verifier: Verifier | None = None  # set when `verify_fraction` > 0
        self._writing: set[asyncio.Future[None]] = set()

    def begin(
        self,
        req: GatewayRequest,
        caller: str,
        headers: Mapping[str, str],
        route: str,
        embedded: Embedded | None = None,
    ) -> CacheCall:
        """This request's cache decisions, taken without waiting on the store; `embedded`
        holds the question vectors the request's other stages computed (and gets ours)."""
        control = _directives(headers.get("cache-control"))
        cacheable = req.operation != "embed" and (self.config.cache_sampled or _greedy(req))
        scope = SHARED_SCOPE if self.config.scope == "shared" else caller
        key = exact_key(scope, req) if cacheable else None
        return CacheCall(
            self,
            req,
            scope,
            key,
            route,
            look=cacheable and "no-cache" not in control,
            store=cacheable and "no-store" not in control,
            embedded=embedded,
        )

    async def get(self, key: str) -> CachedEntry | None:
        started = time.perf_counter()
        try:
            raw = await self.store.get(key)
            return decode_entry(raw) if raw is not None else None
        except (CacheStoreError, ValueError, KeyError, TypeError, IndexError) as exc:
            self._failed("lookup", exc)
            raise CacheStoreError(str(exc)) from None
        finally:
            self.metrics.cache_lookup.labels(self.target).observe(time.perf_counter() - started)

    def put(
        self, key: str, entry: CachedEntry, route: str, question: Question | None = None
    ) -> None:
        """Store `entry` in the background: the response never waits for the write. A
        `question` (semantic cache) is indexed once the entry is written."""
        task = asyncio.ensure_future(self._put(key, encode_entry(entry), route, question))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def _put(self, key: str, value: bytes, route: str, question: Question | None) -> None:
        record = None  # the question's vector, stored with the entry and dropped with it
        if question is not None and self.semantic is not None:
            record = await self.semantic.record(*question)
        try:
            totals = await self.store.put(key, value, self.config.ttl_seconds, record)
        except CacheStoreError as exc:
            self._failed("store", exc)
            return
        self.metrics.cache_stores.labels(self.target, route).inc()
        self.show(totals)
        if record is not None and self.semantic is not None:
            self.semantic.add(record.partition, record.text, record.vector, key)

    async def purge(self) -> int:
        """Empty the store, once the writes under way landed, and the semantic index; how
        many entries there were (`CacheStoreError` when the store cannot be reached)."""
        while self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)
        removed = await self.store.clear()
        if self.semantic is not None:
            self.semantic.clear()
        self.show(Totals(0, 0))
        return removed

    def show(self, totals: Totals) -> None:
        self.metrics.cache_entries.labels(self.target).set(totals.entries)
        self.metrics.cache_bytes.labels(self.target).set(totals.bytes)

    def _failed(self, operation: str, exc: BaseException) -> None:
        self.metrics.cache_errors.labels(self.target, operation).inc()
        logger.warning(
            "cache %s for target %s failed (%s); serving uncached",
            operation,
            self.target,
            type(exc).__name__,
        )

    async def close(self) -> None:
        """Cancel the verifications, finish the writes under way, then close the store."""
        if self.verifier is not None:
            await self.verifier.close()
        while self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)
        if self.semantic is not None:
            await self.semantic.close()
        await self.store.close()


class CacheCall:
    """One request's pass through the cache: its key, what it may do, what happened."""

    def __init__(
        self,
        cache: ExactCache,
        request: GatewayRequest,
        scope: str,
        key: str | None,
        route: str,
        look: bool,
        store: bool,
        embedded: Embedded | None = None,
    ) -> None:
        self.cache, self.request, self.scope = cache, request, scope
        self.key, self.route = key, route
        self.look, self.store = look, store
        self.embedded: Embedded = {} if embedded is None else embedded
        self.status = "bypass"
        self.match = "exact"  # how a hit was found
        self.nearest: float | None = None  # the semantic search's nearest similarity
        self.found = key  # the key of the entry a hit replays
        self._question: Question | None = None
        self._embeddable = True  # False once the question proved too long to embed
        self._choices: dict[int, list[TokenBatch]] = {}
        self._done: dict[int, SippTextResponse] = {}
        self._complete = False

    @property
    def headers(self) -> dict[str, str]:
        if self.status == "hit":
            return {CACHE_HEADER: self.status, MATCH_HEADER: self.match}
        return {CACHE_HEADER: self.status}

    async def lookup(self) -> CachedEntry | None:
        """The stored answer, or None (a miss, or a bypass when lookup is skipped)."""
        entry = None
        if self.look and self.key is not None:
            try:
                entry = await self.cache.get(self.key)
                self.status = "hit" if entry is not None else "miss"
                if entry is None and self.cache.semantic is not None:
                    entry = await self._by_meaning(self.cache.semantic)
            except CacheStoreError:  # served uncached: nor is its answer written to a failing store
                self.status, self.store = "bypass", False
        self.cache.metrics.cache_requests.labels(self.cache.target, self.route, self.status).inc()
        return entry

    async def _by_meaning(self, semantic: SemanticStage) -> CachedEntry | None:
        question = self._questioned()
        if question is None:
            return None
        partition, text, _ = question
        known = (semantic.settings.embedding_target, text)
        if known in self.embedded:  # the route stage embedded it already
            vector = self.embedded[known]
        else:
            try:
                vector = self.embedded[known] = await semantic.embed(text)
            except EmbeddingFailed:  # no embedding, no semantic entry: served and not stored
                self.status, self.store = "bypass", False
                return None
        if vector is None:  # too long for the embedding target: cached exactly only
            self._embeddable = False
            return None
        self._question = (partition, text, vector)
        key, self.nearest = semantic.search(partition, text, vector)
        if key is None:
            return None
        entry = await self.cache.get(key)
        if entry is None:  # evicted or expired in the store since: forget its vector
            semantic.remove(key)
            return None
        self.status, self.match, self.found = "hit", "semantic", key
        self.cache.metrics.cache_semantic_hits.labels(self.cache.target).inc()
        return entry

    def _questioned(self) -> Question | None:
        """This request's question for the semantic index, when it has a last user message."""
        if self._question is None and self._embeddable and self.cache.semantic is not None:
            text = last_user_text(self.request)
            if isinstance(text, str) and text.strip():
                self._question = (partition_key(self.scope, self.request), text, None)
        return self._question

    def served(self, entry: CachedEntry) -> None:
        """The hit passed the limits and is answered: count the tokens it saved, and
        maybe verify it upstream in the background."""
        if entry.usage is not None:
            self.cache.metrics.cache_tokens_saved.labels(self.cache.target).inc(
                entry.usage.total_tokens
            )
        if self.cache.verifier is not None and self.found is not None:
            self.cache.verifier.offer(self.request, entry, self.match, self.found)

    def _keepable(self, responses: Iterable[SippTextResponse]) -> bool:
        allowed = self.cache.config.store_finish
        return (
            self.store
            and self.key is not None
            and all(r.finish_reason in allowed for r in responses)
        )

    def keep(self, responses: tuple[SippTextResponse, ...]) -> None:
        """Store a complete non-streamed answer when the target keeps its finish reasons."""
        if responses and self._keepable(responses):
            assert self.key is not None
            entry = CachedEntry(tuple(map(CachedChoice, responses)))
            self.cache.put(self.key, entry, self.route, self._questioned())
            self.status = "store"

    async def recording(self, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        """`events`, remembering the deltas and ends of each choice; complete only once the
        last event (the total usage) went by."""
        async for event in events:
            if isinstance(event, TextDelta):
                self._choices.setdefault(event.index, []).append(event.batch)
            elif isinstance(event, ChoiceDone):
                self._done[event.index] = event.response
            else:
                self._complete = True
            yield event

    def keep_stream(self, succeeded: bool) -> None:
        """Store a streamed answer that ran to its end (`succeeded`: no failure, the
        consumer read it all) with the pieces it was streamed in."""
        if not succeeded or not self._complete or not self._done:
            return
        responses = [self._done[i] for i in sorted(self._done)]
        if not self._keepable(responses):
            return
        assert self.key is not None
        choices = tuple(
            CachedChoice(self._done[i], tuple(self._choices.get(i, ()))) for i in sorted(self._done)
        )
        self.cache.put(self.key, CachedEntry(choices), self.route, self._questioned())


async def replay_stream(
    fmt: WireFormat,
    req: GatewayRequest,
    entry: CachedEntry,
    rec: RequestRecord,
    request_id: str,
    reservation: Reservation | None,
) -> AsyncIterator[bytes]:
    """`fmt`'s frames for a stored answer; the record is settled and finished however the
    stream ends."""
    from ..shaping import settle

    try:
        async for frame in fmt.encode_stream(req, _events(rec, replay_events(entry)), request_id):
            yield frame
    except SippError as exc:  # a format refusing the stored answer: say so in the stream
        rec.fail(exc.code)
        yield fmt.stream_error(exc)
    except Exception as exc:
        logger.exception("unexpected error replaying a cached answer %s", request_id)
        rec.fail("execution")
        yield fmt.stream_error(ExecutionError(f"internal error: {type(exc).__name__}"))
    finally:
        settle(reservation, rec, ran=True)
        rec.finish()


async def _events(rec: RequestRecord, events: Iterator[Event]) -> AsyncIterator[Event]:
    for event in events:
        if isinstance(event, TextDelta):
            rec.first_token()
        yield event


def _greedy(req: GatewayRequest) -> bool:
    """Whether the answer is meant to be repeatable: temperature 0. An unset temperature
    is the target's default, which samples (1 at OpenAI and Anthropic, 0.8 locally)."""
    temperature = req.options.temperature
    return temperature is not None and temperature == 0


def _directives(value: str | None) -> frozenset[str]:
    if not value:
        return frozenset()
    return frozenset(part.split("=")[0].strip().lower() for part in value.split(","))
