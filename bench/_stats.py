"""Summaries every benchmark prints: median with spread, and percentiles."""

from __future__ import annotations

import statistics


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def spread(values: list[float], fmt: str = ".1f", unit: str = "", scale: float = 1.0) -> str:
    """`median X unit (min Y, max Z)`, each value multiplied by `scale` first."""
    med, lo, hi = (
        format(v * scale, fmt) for v in (statistics.median(values), min(values), max(values))
    )
    suffix = f" {unit}" if unit else ""
    return f"median {med}{suffix} (min {lo}, max {hi})"
