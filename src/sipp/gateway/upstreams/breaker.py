"""A circuit breaker for one deployment: closed, open after too many failures, and
half-open for one probe once its cooldown has passed."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Literal

from .policy import BreakerPolicy

__all__ = ["Breaker", "BreakerState"]

BreakerState = Literal["closed", "open", "half_open"]


class Breaker:
    """Opens when, over the last `window_seconds`, at least `min_requests` attempts ended
    and at least `failure_rate` of them failed, or after `consecutive_failures` failures
    in a row. After `cooldown_seconds` one attempt may
    probe: its success closes the breaker, its failure opens it for another cooldown."""

    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._outcomes: deque[tuple[float, bool]] = deque()  # (when, failed)
        self._failures = 0
        self._streak = 0  # failures in a row
        self._opened_at: float | None = None
        self._probing = False
        self.opened = 0  # times it opened, for metrics

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        return "half_open" if self._probing else "open"

    def error_rate(self) -> float | None:
        """The failed share of the attempts recorded within the window (None: none yet);
        a read, so a dashboard poll never moves the window."""
        horizon = self._clock() - self.policy.window_seconds
        recent = [failed for at, failed in self._outcomes if at >= horizon]
        return sum(recent) / len(recent) if recent else None

    def available(self) -> bool:
        """May an attempt go here now (closed, or open with its cooldown over and no
        probe already out)?"""
        if self._opened_at is None:
            return True
        if self._probing:
            return False
        return self._clock() - self._opened_at >= self.policy.cooldown_seconds

    def start(self) -> bool:
        """An attempt starts here; True if it is the half-open probe."""
        if self._opened_at is not None and not self._probing and self.available():
            self._probing = True
            return True
        return False

    def record(self, failed: bool, probe: bool) -> None:
        """How an attempt that went here ended (`probe` as `start` returned)."""
        now = self._clock()
        if self._opened_at is not None:
            if probe:  # only the probe decides; stragglers from before it opened do not
                self._probing = False
                if failed:
                    self._opened_at = now
                else:
                    self._close()
            return
        self._outcomes.append((now, failed))
        self._failures += failed
        self._streak = self._streak + 1 if failed else 0
        horizon = now - self.policy.window_seconds
        while self._outcomes and self._outcomes[0][0] < horizon:
            self._failures -= self._outcomes.popleft()[1]
        count = len(self._outcomes)
        streak = self.policy.consecutive_failures
        if (streak and self._streak >= streak) or (
            count >= self.policy.min_requests and self._failures >= self.policy.failure_rate * count
        ):
            self._opened_at = now
            self.opened += 1

    def _close(self) -> None:
        self._opened_at = None
        self._outcomes.clear()
        self._failures = 0
        self._streak = 0

    def abandon(self, probe: bool) -> None:
        """An attempt ended without telling anything about the deployment (the caller went
        away); a probe's turn passes to the next attempt."""
        if probe:
            self._probing = False
