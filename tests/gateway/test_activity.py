"""The dashboard's rolling history: histogram quantiles, buckets, gaps, rollover."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from sipp.gateway.activity import (
    BUCKET_SECONDS,
    HISTORY_BUCKETS,
    RECENT,
    Activity,
    LogHistogram,
    RequestRecord,
)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _record(activity: Activity, **fields: object) -> RequestRecord:
    record = RequestRecord("query", activity.record)
    for key, value in fields.items():
        setattr(record, key, value)
    record.finish()
    return record


@pytest.mark.parametrize("seed", range(5))
def test_histogram_quantiles_are_within_one_bin(seed: int) -> None:
    rng = random.Random(seed)
    samples = [rng.lognormvariate(-3, 1.5) for _ in range(5000)]
    histogram = LogHistogram()
    for s in samples:
        histogram.add(s)
    for q in (0.5, 0.9, 0.95, 0.99):
        exact = float(np.quantile(samples, q, method="inverted_cdf"))
        got = histogram.quantile(q)
        assert got is not None
        assert exact / 1.1 <= got <= exact * 1.1, (q, exact, got)


def test_histogram_edges_and_merge() -> None:
    empty = LogHistogram()
    assert empty.quantile(0.5) is None
    tiny, huge = LogHistogram(), LogHistogram()
    tiny.add(0.0)
    huge.add(10_000.0)  # beyond the top bin: counted there, not lost
    tiny.merge(huge)
    assert tiny.total == 2
    low, high = tiny.quantile(0.5), tiny.quantile(1.0)
    assert low is not None and low < 0.001
    assert high is not None and high > 60


def test_records_land_in_totals_buckets_and_keys() -> None:
    clock = Clock()
    activity = Activity(clock)
    _record(activity, target="local", caller="app", input_tokens=5, output_tokens=7)
    _record(activity, target="local", caller="app", code="execution")
    _record(activity, caller="other", code="not_found")  # never resolved to a target
    activity.refused("rate_limited")
    activity.refused("admission_rejected")
    snap = activity.snapshot(in_flight=3)
    assert snap["totals"]["requests"] == 3 and snap["totals"]["errors"] == 2
    assert snap["totals"]["errors_by_code"] == {"execution": 1, "not_found": 1}
    assert snap["totals"]["rate_limited"] == 1 and snap["totals"]["admission_rejected"] == 1
    assert snap["targets"] == {
        "local": {"requests": 2, "errors": 1, "input_tokens": 5, "output_tokens": 7}
    }
    assert snap["callers"]["other"]["errors"] == 1
    assert activity.last_error["local"]["code"] == "execution"
    last = snap["history"][-1]
    assert last["requests"] == 3 and last["rate_limited"] == 1 and last["in_flight"] == 3
    assert last["latency_p50_ms"] is not None  # from the one success only
    assert snap["in_flight"] == 3


def test_recent_requests_are_bounded_newest_first_with_their_route() -> None:
    clock = Clock()
    activity = Activity(clock)
    for i in range(RECENT + 5):
        clock.now += 1
        _record(activity, target="fast", caller="app", route=f"rule-{i}")
    _record(activity, caller="app", code="not_found")  # no target, no route
    recent = activity.snapshot(in_flight=0)["recent"]
    assert len(recent) == RECENT
    assert recent[0]["route"] is None and recent[0]["code"] == "not_found"
    assert recent[1]["route"] == f"rule-{RECENT + 4}" and recent[1]["target"] == "fast"
    assert recent[-1]["route"] == "rule-6"  # the oldest ones fell off
    assert recent[1]["at"] == clock.now and recent[1]["duration_ms"] is not None


def test_client_side_errors_do_not_mark_the_target_unhealthy() -> None:
    activity = Activity(Clock())
    for code in ("invalid_request", "authorization", "client_closed"):
        _record(activity, target="local", code=code)
    assert "local" not in activity.last_error


def test_history_has_fixed_length_fills_gaps_and_forgets_old_buckets() -> None:
    clock = Clock()
    activity = Activity(clock)
    _record(activity, target="t")
    clock.now += 3 * BUCKET_SECONDS
    _record(activity, target="t")
    _record(activity, target="t")
    history = activity.snapshot(0)["history"]
    assert len(history) == HISTORY_BUCKETS
    assert [row["requests"] for row in history[-4:]] == [1, 0, 0, 2]
    assert all(b["t"] - a["t"] == BUCKET_SECONDS for a, b in itertools.pairwise(history))
    clock.now += HISTORY_BUCKETS * BUCKET_SECONDS
    snap = activity.snapshot(0)
    assert sum(row["requests"] for row in snap["history"]) == 0
    assert snap["totals"]["requests"] == 3  # totals outlive the window
    assert len(activity._buckets) <= HISTORY_BUCKETS


def test_live_rates_cover_the_last_minute() -> None:
    clock = Clock(now=1_000_000.0)  # exactly on a bucket boundary
    activity = Activity(clock)
    for _ in range(30):
        _record(activity, target="t")
    clock.now += 55  # the live window now spans 55 s + the current bucket's 0 s
    live = activity.snapshot(0)["live"]
    assert live["requests_per_second"] == pytest.approx(30 / 55, rel=1e-3)
    clock.now += 10  # the first bucket has left the one-minute window
    assert activity.snapshot(0)["live"]["requests_per_second"] == 0
