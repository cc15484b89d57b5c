"""Latency statistics for the benchmark: n / min / p50 / p90 / p99 / max.

Percentiles interpolate linearly between the two closest ranks (Hyndman
and Fan's type 7, NumPy's and R's default).  With few samples a nearest-rank
p99 would simply be the maximum; interpolation at least says where between
the two slowest samples the 99th percentile sits, and it agrees with what a
reader checking the JSON samples in NumPy or a spreadsheet gets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of values sorted ascending.

    :raises ValueError: no values, or ``q`` outside 0..100.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0..100")
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


@dataclass(frozen=True)
class Summary:
    """Order statistics of one series of latencies, in seconds."""

    n: int
    min: float
    p50: float
    p90: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, values: Iterable[float]) -> "Summary":
        """:raises ValueError: no values."""
        ordered = sorted(values)
        if not ordered:
            raise ValueError("summary of no values")
        return cls(n=len(ordered), min=ordered[0], p50=percentile(ordered, 50),
                   p90=percentile(ordered, 90), p99=percentile(ordered, 99), max=ordered[-1],
                   mean=math.fsum(ordered) / len(ordered))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cdf(values: Iterable[float]) -> list[tuple[float, float]]:
    """Empirical CDF points ``(value, fraction of samples <= value)``."""
    ordered = sorted(values)
    n = len(ordered)
    return [(v, (i + 1) / n) for i, v in enumerate(ordered)]


def within(value: float, reference: float, tolerance: float) -> bool:
    """Whether ``value`` is within ``reference`` ± ``tolerance`` (a fraction)."""
    return abs(value - reference) <= tolerance * reference


def format_seconds(seconds: float) -> str:
    """A latency for people: ``850 µs``, ``3.12 ms``, ``29.4 s``."""
    if seconds != seconds:  # NaN: no measurement
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms" if seconds < 0.1 else f"{seconds * 1e3:.0f} ms"
    if seconds < 100:
        return f"{seconds:.3g} s"
    return f"{seconds:.0f} s"
