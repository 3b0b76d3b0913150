"""Prometheus metrics of one gateway process. Labels stay low-cardinality:
operation, error code and configured target names only."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .activity import RequestRecord

if TYPE_CHECKING:
    from .upstreams.pool import Pool

__all__ = ["GatewayMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class _LocalRuntimeCollector(Collector):
    """Reads each local target's engine counters at scrape time."""

    def __init__(self, source: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        for target, stats in self._source().items():
            for key, value in stats.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                family = families.get(key)
                if family is None:
                    family = GaugeMetricFamily(
                        f"sipp_local_{key}",
                        f"local engine {key.replace('_', ' ')}",
                        labels=["target"],
                    )
                    families[key] = family
                family.add_metric([target], float(value))
        yield from families.values()


_BREAKER_STATES = {"closed": 0.0, "open": 1.0, "half_open": 2.0}


class _PoolCollector(Collector):
    """Reads each pooled deployment's breaker, in-flight count and latency at scrape time."""

    def __init__(self, source: Callable[[], Iterable[Pool]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        labels = ["target", "deployment"]
        state = GaugeMetricFamily(
            "sipp_gateway_breaker_state",
            "Circuit breaker per deployment: 0 closed, 1 open, 2 half-open (probing)",
            labels=labels,
        )
        opened = CounterMetricFamily(
            "sipp_gateway_breaker_opened", "Times a deployment's breaker opened", labels=labels
        )
        in_flight = GaugeMetricFamily(
            "sipp_gateway_deployment_in_flight", "Attempts in flight per deployment", labels=labels
        )
        latency = GaugeMetricFamily(
            "sipp_gateway_deployment_latency_seconds",
            "EWMA of a deployment's time to first token (or to the response)",
            labels=labels,
        )
        for pool in self._source():
            for dep in pool.deployments:
                key = [pool.name, dep.name]
                state.add_metric(key, _BREAKER_STATES[dep.breaker.state])
                opened.add_metric(key, float(dep.breaker.opened))
                in_flight.add_metric(key, float(dep.in_flight))
                if dep.latency is not None:
                    latency.add_metric(key, dep.latency)
        yield from (state, opened, in_flight, latency)


class GatewayMetrics:
    def __init__(
        self,
        local_stats: Callable[[], dict[str, dict[str, Any]]],
        pools: Callable[[], Iterable[Pool]] = tuple,
    ) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "sipp_gateway_requests", "Public requests by operation", ["operation"], registry=r
        )
        self.errors = Counter(
            "sipp_gateway_errors",
            "Failed requests by operation and error code",
            ["operation", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "sipp_gateway_request_duration_seconds",
            "Time from request to last byte",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "sipp_gateway_time_to_first_token_seconds",
            "Time from request to first streamed token",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "sipp_gateway_overhead_seconds",
            "Request time not spent waiting on the target",
            ["operation"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.input_tokens = Counter(
            "sipp_gateway_input_tokens", "Prompt tokens by target", ["target"], registry=r
        )
        self.output_tokens = Counter(
            "sipp_gateway_output_tokens", "Generated tokens by target", ["target"], registry=r
        )
        self.in_flight = Gauge(
            "sipp_gateway_in_flight_requests", "Requests being served", registry=r
        )
        self.rate_limited = Counter(
            "sipp_gateway_rate_limited", "Requests refused by the per-client rate limit", registry=r
        )
        self.admission_rejected = Counter(
            "sipp_gateway_admission_rejected",
            "Requests refused because max_concurrent_requests was full",
            registry=r,
        )
        self.upstream_errors = Counter(
            "sipp_gateway_upstream_errors",
            "Provider failures by target and upstream HTTP status (or error code without one)",
            ["target", "status"],
            registry=r,
        )
        self.upstream_attempts = Counter(
            "sipp_gateway_upstream_attempts",
            "Attempts on upstream deployments by target, deployment and outcome "
            "(ok, connect, timeout, 429, 5xx, 4xx, context, error, unavailable, cancelled; "
            "rate_limited: skipped, the target's own limits refused it)",
            ["target", "deployment", "outcome"],
            registry=r,
        )
        self.limit_refused = Counter(
            "sipp_gateway_limit_refused",
            "Requests refused by a caller's or target's limit ([tokens.limits], [targets.limits])",
            ["scope", "limit"],
            registry=r,
        )
        self.state_errors = Counter(
            "sipp_gateway_state_errors",
            "Limit operations that could not reach the state store (Redis)",
            registry=r,
        )
        self.state_available = Gauge(
            "sipp_gateway_state_available",
            "1 while the state store answered the last limit operation, else 0",
            registry=r,
        )
        self.state_available.set(1)
        self.cache_requests = Counter(
            "sipp_gateway_cache_requests",
            "Requests to cached targets by target, route and result (hit, miss, bypass)",
            ["target", "route", "result"],
            registry=r,
        )
        self.cache_stores = Counter(
            "sipp_gateway_cache_stores",
            "Answers stored in a target's cache, by target and route",
            ["target", "route"],
            registry=r,
        )
        self.cache_lookup = Histogram(
            "sipp_gateway_cache_lookup_seconds",
            "Time to look an answer up in a target's cache",
            ["target"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.cache_tokens_saved = Counter(
            "sipp_gateway_cache_tokens_saved",
            "Tokens (input + output) that cache hits answered without the target",
            ["target"],
            registry=r,
        )
        self.cache_entries = Gauge(
            "sipp_gateway_cache_entries", "Entries in a target's cache", ["target"], registry=r
        )
        self.cache_bytes = Gauge(
            "sipp_gateway_cache_bytes",
            "Bytes of answers in a target's cache",
            ["target"],
            registry=r,
        )
        self.cache_errors = Counter(
            "sipp_gateway_cache_errors",
            "Cache lookups and stores that failed (the request was served uncached)",
            ["target", "operation"],
            registry=r,
        )
        self.cache_semantic_hits = Counter(
            "sipp_gateway_cache_semantic_hits",
            "Cache hits found by meaning (a paraphrase of a stored question)",
            ["target"],
            registry=r,
        )
        self.cache_semantic_entries = Gauge(
            "sipp_gateway_cache_semantic_entries",
            "Questions in a target's semantic index (one per stored answer it covers)",
            ["target"],
            registry=r,
        )
        self.cache_guard_rejections = Counter(
            "sipp_gateway_cache_guard_rejections",
            "Semantic candidates above the threshold that the guard turned away",
            ["target"],
            registry=r,
        )
        self.cache_embedding = Histogram(
            "sipp_gateway_cache_embedding_seconds",
            "Time to embed a question for a target's semantic cache",
            ["target"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=r,
        )
        self.cache_embedding_failures = Counter(
            "sipp_gateway_cache_embedding_failures",
            "Embedding calls of the semantic cache that failed (served uncached)",
            ["target"],
            registry=r,
        )
        self.cache_verifications = Counter(
            "sipp_gateway_cache_verifications",
            "Cache hits also sent upstream to check the answer (verify_fraction), by target, "
            "how the hit was found (exact, semantic) and outcome (agree, disagree, error, "
            "skipped: the target was busy)",
            ["target", "match", "outcome"],
            registry=r,
        )
        self.cache_false_hit_rate = Gauge(
            "sipp_gateway_cache_false_hit_rate",
            "Verified hits whose fresh answer disagreed: disagree / (agree + disagree)",
            ["target", "match"],
            registry=r,
        )
        self.route_decisions = Counter(
            "sipp_gateway_route_decisions",
            "Routing decisions on routed names by rule (or default), target chosen and mode "
            "(enforce: acted on; shadow: counted only)",
            ["route", "target", "mode"],
            registry=r,
        )
        self.route_embedding_failures = Counter(
            "sipp_gateway_route_embedding_failures",
            "Route rules with examples that could not embed (the rule did not hold)",
            ["route"],
            registry=r,
        )
        r.register(_LocalRuntimeCollector(local_stats))
        r.register(_PoolCollector(pools))

    def observe(self, record: RequestRecord) -> None:
        op = record.operation
        self.requests.labels(op).inc()
        if record.code is not None:
            self.errors.labels(op, record.code).inc()
        self.latency.labels(op).observe(record.duration)
        if record.ttft is not None:
            self.ttft.labels(op).observe(record.ttft)
        if not record.stream:  # a stream's time is mostly the client reading it
            self.overhead.labels(op).observe(max(0.0, record.duration - record.waited))
        if record.target is not None:
            if record.input_tokens:
                self.input_tokens.labels(record.target).inc(record.input_tokens)
            if record.output_tokens:
                self.output_tokens.labels(record.target).inc(record.output_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
