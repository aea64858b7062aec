"""Pure helpers of the limiter benchmark: percentiles, sliding-window peaks, per-second series, tables.

No I/O here, so tests/bench checks them against hand-computed tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (the smallest value with at least p % of the values at or below it).

    Nearest rank, not interpolation: every reported latency is one a request really had.
    """
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    if not values:
        return None
    ordered = sorted(values)
    rank = math.ceil(p * len(ordered) / 100)  # p / 100 first would make 7 % of 100 rank 8
    return ordered[rank - 1]


def peak_in_window(times: Sequence[float], width_s: float) -> int:
    """The most events in any half-open interval [t, t + width_s) (times need not be sorted).

    An interval that holds the most events can always start at an event, so a two-pointer
    sweep over the sorted times is exact.
    """
    if width_s <= 0:
        raise ValueError(f"window width must be positive, got {width_s}")
    ordered = sorted(times)
    best = 0
    lo = 0
    for hi, t in enumerate(ordered):
        while t - ordered[lo] >= width_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def per_second(times: Sequence[float], start: float, seconds: int) -> list[int]:
    """Events per whole second since `start`: bucket i counts [start + i, start + i + 1)."""
    counts = [0] * seconds
    for t in times:
        i = math.floor(t - start)
        if 0 <= i < seconds:
            counts[i] += 1
    return counts


def in_window(times: Sequence[float], start: float, end: float) -> list[float]:
    """The times in [start, end)."""
    return [t for t in times if start <= t < end]


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when the denominator is zero (printed as n/a)."""
    return numerator / denominator if denominator else None


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Right-aligned plain-text columns (the first column left-aligned), one header rule."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = str(cells[0]).ljust(widths[0])
        rest = [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for the table; None (no data) prints as n/a."""
    return "n/a" if value is None else f"{value:.{digits}f}"
