"""What the gateway has been doing, for the admin dashboard: one record per public
request, totals per target and per caller, and a rolling history in fixed time
buckets (the last 15 minutes), all in this process's memory.

Latencies go into log-spaced histograms rather than sample lists, so a bucket's
memory is bounded whatever the traffic, buckets merge by addition, and a
quantile is exact to within one bin (10 %). Keys are configured target names
and caller labels only, never anything a client chose, so the maps stay small.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .._types import Usage

__all__ = ["Activity", "LogHistogram", "RequestRecord"]

BUCKET_SECONDS = 5
HISTORY_BUCKETS = 180  # 15 minutes
LIVE_BUCKETS = 12  # "live" figures cover the last minute
RECENT = 50  # requests listed one by one, newest first
# Failures that say something about the target itself (for its health), as opposed
# to the caller's request or the caller hanging up.
TARGET_FAULTS = frozenset(
    {"execution", "upstream", "model_load", "backend_unavailable", "unavailable"}
)


class LogHistogram:
    """Counts of durations in bins 10 % wide from 1 ms up (about 17 minutes at the top)."""

    _BASE = 0.001
    _LOG_FACTOR = math.log(1.1)
    _BINS = 160

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0

    def add(self, seconds: float) -> None:
        if seconds < self._BASE:
            index = 0
        else:
            index = min(self._BINS, 1 + int(math.log(seconds / self._BASE) / self._LOG_FACTOR))
        self.counts[index] = self.counts.get(index, 0) + 1
        self.total += 1

    def merge(self, other: LogHistogram) -> None:
        for index, n in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + n
        self.total += other.total

    def quantile(self, q: float) -> float | None:
        """The `q` quantile in seconds (the geometric middle of its bin), or None if empty."""
        if not self.total:
            return None
        rank = max(1, math.ceil(q * self.total))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                if index == 0:
                    return self._BASE / 2
                return self._BASE * math.exp((index - 0.5) * self._LOG_FACTOR)
        raise AssertionError("unreachable: rank <= total")


@dataclass
class RequestRecord:
    """One public request as the metrics see it, filled in while it is served.

    `finish` hands it to the sink exactly once, from the handler or, for a
    stream, from the stream's end."""

    operation: str
    sink: Callable[[RequestRecord], None]
    started: float = field(default_factory=time.perf_counter)
    target: str | None = None  # set only once the name resolved to a configured target
    caller: str | None = None
    code: str | None = None  # error code, None while successful
    ttft: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    waited: float = 0.0  # time spent waiting on the target (non-streaming)
    stream: bool = False
    duration: float = 0.0
    attempts: int = 0  # upstream attempts it took (retries and fallbacks included)
    answered_by: str | None = None  # the target (or target/deployment) that answered
    route: str | None = None  # the `[[route_rules]]` rule (or "default") of a routed name
    _done: bool = False

    def first_token(self) -> None:
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.started

    def usage(self, usage: Usage | None) -> None:
        if usage is not None:
            self.input_tokens += usage.input_tokens
            self.output_tokens += usage.output_tokens

    def fail(self, code: str) -> None:
        self.code = code

    def finish(self) -> None:
        if not self._done:
            self._done = True
            self.duration = time.perf_counter() - self.started
            self.sink(self)


@dataclass
class _Tally:
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def add(self, record: RequestRecord) -> None:
        self.requests += 1
        self.errors += record.code is not None
        self.input_tokens += record.input_tokens
        self.output_tokens += record.output_tokens


class _Bucket:
    __slots__ = (
        "admission_rejected",
        "errors",
        "in_flight",
        "index",
        "latency",
        "rate_limited",
        "tally",
        "ttft",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.tally = _Tally()
        self.errors: dict[str, int] = {}
        self.latency = LogHistogram()
        self.ttft = LogHistogram()
        self.rate_limited = 0
        self.admission_rejected = 0
        self.in_flight = 0  # the most seen at once during the bucket


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


class Activity:
    """Totals since start plus the last `HISTORY_BUCKETS` buckets of `BUCKET_SECONDS`."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._buckets: deque[_Bucket] = deque()
        self.totals = _Tally()
        self.errors_by_code: dict[str, int] = {}
        self.rate_limited = 0
        self.admission_rejected = 0
        self.by_target: dict[str, _Tally] = {}
        self.by_caller: dict[str, _Tally] = {}
        self.last_error: dict[str, dict[str, Any]] = {}  # target -> {code, at}, faults only
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)

    def _current(self) -> _Bucket:
        index = int(self._clock() // BUCKET_SECONDS)
        if not self._buckets or self._buckets[-1].index != index:
            self._buckets.append(_Bucket(index))
            while self._buckets[0].index <= index - HISTORY_BUCKETS:
                self._buckets.popleft()
        return self._buckets[-1]

    def record(self, record: RequestRecord) -> None:
        bucket = self._current()
        bucket.tally.add(record)
        self.totals.add(record)
        if record.code is not None:
            bucket.errors[record.code] = bucket.errors.get(record.code, 0) + 1
            self.errors_by_code[record.code] = self.errors_by_code.get(record.code, 0) + 1
        if record.code is None:
            bucket.latency.add(record.duration)
        if record.ttft is not None:
            bucket.ttft.add(record.ttft)
        if record.target is not None:
            self.by_target.setdefault(record.target, _Tally()).add(record)
            if record.code in TARGET_FAULTS:
                self.last_error[record.target] = {"code": record.code, "at": self._clock()}
        if record.caller is not None:
            self.by_caller.setdefault(record.caller, _Tally()).add(record)
        self.recent.append(
            {
                "at": self._clock(),
                "operation": record.operation,
                "target": record.target,
                "caller": record.caller,
                "route": record.route,
                "code": record.code,
                "stream": record.stream,
                "duration_ms": _ms(record.duration),
            }
        )

    def refused(self, reason: str) -> None:
        """Count a request refused before it ran: `rate_limited` or `admission_rejected`."""
        bucket = self._current()
        if reason == "rate_limited":
            bucket.rate_limited += 1
            self.rate_limited += 1
        else:
            bucket.admission_rejected += 1
            self.admission_rejected += 1

    def in_flight(self, now_in_flight: int) -> None:
        bucket = self._current()
        bucket.in_flight = max(bucket.in_flight, now_in_flight)

    def snapshot(self, in_flight: int) -> dict[str, Any]:
        """Everything the dashboard draws, as JSON-ready data; history oldest first,
        one entry per bucket, gaps filled with zeros so charts keep a steady x axis."""
        self.in_flight(in_flight)  # a long stream may span buckets with no acquire or release
        now = self._clock()
        last = int(now // BUCKET_SECONDS)
        by_index = {b.index: b for b in self._buckets}
        history = []
        for index in range(last - HISTORY_BUCKETS + 1, last + 1):
            b = by_index.get(index) or _Bucket(index)
            history.append(
                {
                    "t": index * BUCKET_SECONDS,
                    "requests": b.tally.requests,
                    "errors": b.tally.errors,
                    "input_tokens": b.tally.input_tokens,
                    "output_tokens": b.tally.output_tokens,
                    "rate_limited": b.rate_limited,
                    "admission_rejected": b.admission_rejected,
                    "in_flight": b.in_flight,
                    "latency_p50_ms": _ms(b.latency.quantile(0.5)),
                    "latency_p95_ms": _ms(b.latency.quantile(0.95)),
                    "ttft_p50_ms": _ms(b.ttft.quantile(0.5)),
                }
            )
        live = [b for b in self._buckets if b.index > last - LIVE_BUCKETS]
        # The current bucket is partly over: rates divide by the time actually covered.
        span = (LIVE_BUCKETS - 1) * BUCKET_SECONDS + (now - last * BUCKET_SECONDS)
        latency, ttft = LogHistogram(), LogHistogram()
        errors_by_code: dict[str, int] = {}
        requests = errors = 0
        for b in live:
            latency.merge(b.latency)
            ttft.merge(b.ttft)
            requests += b.tally.requests
            errors += b.tally.errors
            for code, n in b.errors.items():
                errors_by_code[code] = errors_by_code.get(code, 0) + n
        return {
            "now": now,
            "bucket_seconds": BUCKET_SECONDS,
            "in_flight": in_flight,
            "live": {
                "window_seconds": LIVE_BUCKETS * BUCKET_SECONDS,
                "requests_per_second": round(requests / span, 3),
                "errors_per_second": round(errors / span, 3),
                "error_ratio": round(errors / requests, 4) if requests else 0.0,
                "errors_by_code": errors_by_code,
                "latency_p50_ms": _ms(latency.quantile(0.5)),
                "latency_p95_ms": _ms(latency.quantile(0.95)),
                "ttft_p50_ms": _ms(ttft.quantile(0.5)),
                "ttft_p95_ms": _ms(ttft.quantile(0.95)),
            },
            "totals": {
                **asdict(self.totals),
                "errors_by_code": dict(self.errors_by_code),
                "rate_limited": self.rate_limited,
                "admission_rejected": self.admission_rejected,
            },
            "targets": {name: asdict(t) for name, t in sorted(self.by_target.items())},
            "callers": {name: asdict(t) for name, t in sorted(self.by_caller.items())},
            "history": history,
            "recent": list(reversed(self.recent)),
        }
