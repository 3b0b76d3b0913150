"""The route stage: `[[route_rules]]` pick the target that serves a public name.

    decode -> charge -> [route: the caller may use the name asked for -> rules in order
    -> the caller may use the target chosen] -> authorize -> cache lookup -> ...

Only a name some rule matches gets here (one dict lookup in the pipeline otherwise).
A rule's conditions all hold or it is skipped; the first enforced rule that holds
picks the target, else the name itself serves when it is a target (`default`). A
shadow rule that holds is counted and logged, never acted on. The caller must be
allowed both the name they asked for and the target chosen: a name cannot widen a
token's allowlist. Prompt tokens are counted for the rule's target (exact with a
local target's tokenizer, else the shaping estimate); a cache condition looks the
request up in the rule target's cache (or `cache_target`'s, for a miss or near miss),
and the pipeline's cache stage reuses that lookup: a `cache = "hit"` rule answers from
the cache, without a second lookup. Examples (route_examples.py) compare the question's
embedding, computed once per request and shared with the cache stage, with the rule's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from .._errors import EndpointNotFoundError, SippError
from .auth import Caller
from .cache.entry import CachedEntry
from .cache.exact import CacheCall
from .cache.keys import last_user_text
from .cache.semantic_stage import Embedder, EmbeddingFailed, Vector, target_embedder
from .request import GatewayRequest
from .route_examples import embed_question
from .routing_config import CacheState, RouteRule
from .shaping import estimate_input

if TYPE_CHECKING:
    from ..local.endpoint import LocalEndpoint
    from .call import PublicCall

__all__ = ["DEFAULT_ROUTE", "ROUTE_HEADER", "RouteContext", "route"]

logger = logging.getLogger("sipp.gateway")
ROUTE_HEADER = "x-sipp-route"
DEFAULT_ROUTE = "default"


class RouteContext:
    """What the rules ask of one request, each answer computed once and only if asked."""

    def __init__(self, call: PublicCall, caller: Caller, req: GatewayRequest) -> None:
        self.call, self.caller, self.req = call, caller, req
        self._requests: dict[str, GatewayRequest] = {}
        self._tokens: dict[str, int] = {}
        self.looked: dict[str, tuple[CacheCall, CachedEntry | None]] = {}
        self.similarity: dict[str, float] = {}  # by rule: the nearest example's, for the log
        self._unembedded: set[str] = set()  # embedding targets that failed this request

    def request_for(self, target: str) -> GatewayRequest:
        """The request as `target` would get it (the cache key names the target)."""
        req = self._requests.get(target)
        if req is None:
            req = self._requests[target] = replace(self.req, target=target)
        return req

    async def holds(self, rule: RouteRule) -> bool:
        req = self.req
        # The cheap conditions first: a rule that fails one never counts or looks up.
        if rule.callers is not None and self.caller.label not in rule.callers:
            return False
        if rule.has_tools is not None and rule.has_tools != bool(req.options.tools):
            return False
        if rule.has_json_schema is not None:
            given = req.generation.response_format
            if rule.has_json_schema != (given is not None and given.type == "json_schema"):
                return False
        if rule.counts_tokens:
            count = await self.prompt_tokens(rule.target)
            if rule.min_prompt_tokens is not None and count < rule.min_prompt_tokens:
                return False
            if rule.max_prompt_tokens is not None and count > rule.max_prompt_tokens:
                return False
        if rule.examples is not None and not await self.matches(rule):
            return False
        if rule.cache is not None:
            looks_in = rule.cache_target or rule.target
            return await self.cache_state(looks_in, rule.near_miss_threshold) == rule.cache
        return True

    async def matches(self, rule: RouteRule) -> bool:
        """Whether the question is near enough in meaning to one of the rule's examples.
        A failed embedding is counted and the rule does not hold: the request is served."""
        examples = rule.examples
        assert examples is not None
        text = last_user_text(self.req)
        if not isinstance(text, str) or not text.strip():
            return False
        embed = target_embedder(self.call.state, examples.embedding_target)
        try:
            matrix = await examples.vectors(embed)
            vector = await self.question(examples.embedding_target, text, embed)
        except EmbeddingFailed as exc:
            self.call.state.metrics.route_embedding_failures.labels(rule.name).inc()
            logger.warning(
                "route rule %s: embedding with %s failed (%s); the rule does not hold",
                rule.name,
                examples.embedding_target,
                exc,
            )
            return False
        if matrix is None or vector is None:  # too long to embed: no meaning to compare
            return False
        found = examples.match(matrix, text, vector)
        self.similarity[rule.name] = found.similarity
        return found.holds

    async def question(self, embedding_target: str, text: str, embed: Embedder) -> Vector | None:
        """`text` embedded by `embedding_target`, once per request (the cache stage reads
        and fills the same `call.embedded`)."""
        known = (embedding_target, text)
        if known in self.call.embedded:
            return self.call.embedded[known]
        if embedding_target in self._unembedded:  # failed already: one attempt a request
            raise EmbeddingFailed("failed earlier in this request")
        try:
            vector = await embed_question(embed, text)
        except EmbeddingFailed:
            self._unembedded.add(embedding_target)
            raise
        self.call.embedded[known] = vector
        return vector

    async def prompt_tokens(self, target: str) -> int:
        count = self._tokens.get(target)
        if count is None:
            count = await self._count(target)
            self._tokens[target] = count
        return count

    async def _count(self, target: str) -> int:
        endpoint = _local_endpoint(self.call, target)
        if endpoint is not None:
            from .prompt_count import local_prompt_tokens

            exact = await local_prompt_tokens(endpoint, self.req)
            if exact is not None:
                return exact
        return estimate_input(self.req)

    async def cache_state(self, target: str, near_miss: float | None = None) -> CacheState:
        """`hit` when `target`'s cache holds this request's answer; `near_miss` when its
        semantic cache has a question at least `near_miss` similar but no hit; else `miss`
        (also when the caller's Cache-Control skips the lookup: nothing answers from it)."""
        looked = self.looked.get(target)
        if looked is None:
            cache = self.call.state.caches[target]  # check: a cache rule's target has one
            request = self.call.request
            caller = self.call.rec.caller or ""
            cache_call = cache.begin(
                self.request_for(target),
                caller,
                request.headers,
                request.url.path,
                self.call.embedded,
            )
            looked = self.looked[target] = (cache_call, await cache_call.lookup())
        cache_call, entry = looked
        if entry is not None:
            return "hit"
        nearest = cache_call.nearest
        if near_miss is not None and nearest is not None and nearest >= near_miss:
            return "near_miss"
        return "miss"


async def route(call: PublicCall, caller: Caller, req: GatewayRequest) -> GatewayRequest:
    """`req` addressed to the target its name's rules choose (403 if the caller may not
    use the name asked for; the authorize stage then checks the target chosen)."""
    state = call.state
    asked = req.target
    call.rec.target = asked
    state.tokens.authorize(caller, asked)  # before any rule runs or looks anything up
    ctx = RouteContext(call, caller, req)
    chosen: RouteRule | None = None
    for rule in state.config.route_rules[asked]:
        if not await ctx.holds(rule):
            continue
        if rule.mode == "shadow":
            _decided(call, asked, rule.name, rule.target, "shadow", ctx.similarity.get(rule.name))
            continue
        chosen = rule
        break
    if chosen is not None:
        name, target = chosen.name, chosen.target
    elif asked in state.target_configs:
        name, target = DEFAULT_ROUTE, asked
    else:  # check refuses such a config; kept so a request never reaches a missing target
        raise EndpointNotFoundError(f"unknown target {asked!r}")
    call.route = call.rec.route = name
    _decided(call, asked, name, target, "enforce", ctx.similarity.get(name))
    looked = ctx.looked.get(target)
    if looked is not None:  # the cache stage replays or misses without a second lookup
        call.cache, call.looked = looked
    return ctx.request_for(target) if target != asked else req


def _decided(
    call: PublicCall,
    asked: str,
    name: str,
    target: str,
    mode: str,
    similarity: float | None = None,
) -> None:
    call.state.metrics.route_decisions.labels(name, target, mode).inc()
    decision: dict[str, object] = {
        "request_id": call.request_id,
        "caller": call.rec.caller,
        "model": asked,
        "route": name,
        "target": target,
        "mode": mode,
    }
    if similarity is not None:  # a rule with examples: how near the question came
        decision["similarity"] = round(similarity, 4)
    logger.info("route %s", json.dumps(decision))


def _local_endpoint(call: PublicCall, target: str) -> LocalEndpoint | None:
    """`target`'s loaded local endpoint (its tokenizer counts exactly), or None."""
    ref = call.state.targets.get(target)
    if ref is None or ref.kind != "local":
        return None
    from ..local.endpoint import LocalEndpoint  # loaded already: a local target is

    try:
        endpoint = call.state.client._registry.resolve(ref, "chat")
    except SippError:
        return None
    return endpoint if isinstance(endpoint, LocalEndpoint) else None
