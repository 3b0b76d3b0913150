"""A deployment's circuit breaker, on a clock the test moves."""

from __future__ import annotations

from sipp.gateway.upstreams.breaker import Breaker
from sipp.gateway.upstreams.policy import BreakerPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


POLICY = BreakerPolicy(window_seconds=10, min_requests=4, failure_rate=0.5, cooldown_seconds=5)


def _breaker() -> tuple[Breaker, Clock]:
    clock = Clock()
    return Breaker(POLICY, clock), clock


def test_opens_only_at_the_failure_rate_over_the_minimum_count() -> None:
    breaker, _ = _breaker()
    for failed in (True, True, True):
        breaker.record(failed, probe=False)
    assert breaker.state == "closed"  # three failures, but fewer than min_requests
    breaker.record(False, probe=False)
    assert breaker.state == "open" and not breaker.available() and breaker.opened == 1


def test_old_outcomes_leave_the_window() -> None:
    breaker, clock = _breaker()
    for _ in range(3):
        breaker.record(True, probe=False)
    clock.now += 11
    for _ in range(3):
        breaker.record(False, probe=False)
    breaker.record(True, probe=False)
    assert breaker.state == "closed"  # 1 failure in 4 inside the window


def test_one_probe_after_the_cooldown_closes_or_reopens() -> None:
    breaker, clock = _breaker()
    for _ in range(4):
        breaker.record(True, probe=False)
    clock.now += 4.9
    assert not breaker.available() and not breaker.start()
    clock.now += 0.2
    assert breaker.available()
    assert breaker.start() is True  # the probe
    assert breaker.state == "half_open" and not breaker.available()  # only one probe
    breaker.record(True, probe=False)  # a straggler from before it opened decides nothing
    assert breaker.state == "half_open"
    breaker.record(True, probe=True)
    assert breaker.state == "open" and not breaker.available()  # another cooldown
    clock.now += 5
    assert breaker.start() is True
    breaker.record(False, probe=True)
    assert breaker.state == "closed" and breaker.available()
    breaker.record(True, probe=False)  # a fresh window: one failure does not reopen it
    assert breaker.state == "closed"


def test_an_abandoned_probe_lets_the_next_attempt_probe() -> None:
    breaker, clock = _breaker()
    for _ in range(4):
        breaker.record(True, probe=False)
    clock.now += 5
    assert breaker.start() is True
    breaker.abandon(probe=True)  # its caller went away: nothing learned
    assert breaker.state == "open" and breaker.start() is True


def test_failures_in_a_row_open_it_among_many_successes() -> None:
    breaker, _ = _breaker()
    for _ in range(20):
        breaker.record(False, probe=False)
    for _ in range(4):
        breaker.record(True, probe=False)
    assert breaker.state == "closed"  # 4 of 24 failed, and not yet 5 in a row
    breaker.record(True, probe=False)
    assert breaker.state == "open"
    off = Breaker(BreakerPolicy(consecutive_failures=0, min_requests=100), Clock())
    for _ in range(50):
        off.record(True, probe=False)
    assert off.state == "closed"  # only the rate, over at least 100 attempts
