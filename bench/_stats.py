"""Summaries every benchmark prints: median with spread, and percentiles."""

from __future__ import annotations

import math
import statistics


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """A confidence interval for the median that assumes no distribution: the j-th
    smallest and j-th largest value, with j the largest order whose binomial(n, 1/2)
    tail stays within (1 - level) / 2. None when there are too few values for one."""
    n = len(values)
    tail, j = 0.0, 0
    while j < n:
        tail += math.comb(n, j) / 2**n  # exact integers: 2.0**n overflows past 1023
        if tail > (1.0 - level) / 2.0:
            break
        j += 1
    if j == 0:
        return None
    ordered = sorted(values)
    return ordered[j - 1], ordered[n - j]


def spread(values: list[float], fmt: str = ".1f", unit: str = "", scale: float = 1.0) -> str:
    """`median X unit (min Y, max Z)`, each value multiplied by `scale` first, and the
    median's 95 % confidence interval when there are six values or more: a ratio whose
    interval holds 1.00 is a tie, not a win or a loss."""
    med, lo, hi = (
        format(v * scale, fmt) for v in (statistics.median(values), min(values), max(values))
    )
    suffix = f" {unit}" if unit else ""
    interval = median_interval(values)
    ci = (
        ""
        if interval is None
        else f"; 95% CI {interval[0] * scale:{fmt}}-{interval[1] * scale:{fmt}}"
    )
    return f"median {med}{suffix} (min {lo}, max {hi}{ci})"
