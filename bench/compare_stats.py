"""Pure helpers of the limiter comparison (bench/limiter_compare.py): fairness, windows, lateness,
Redis command counts, load shaping.

No I/O here, so tests/bench checks them against hand-computed tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from limiter_stats import peak_in_window, percentile

# Commands the benchmark itself sends to a contender's Redis between two snapshots.
HARNESS_COMMANDS = frozenset({"info", "flushall", "flushdb", "config|resetstat", "config"})


def jain(values: Sequence[float]) -> float | None:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1.0 when all equal, 1/n when one gets all.

    None when nobody got anything (undefined, not fair)."""
    squares = sum(v * v for v in values)
    if not values or squares == 0:
        return None
    return sum(values) ** 2 / (len(values) * squares)


def worst_window_ratio(times: Sequence[float], width_s: float, limit: float) -> float | None:
    """The most events in any window of `width_s` over what that window allows; None without events."""
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    if not times:
        return None
    return peak_in_window(times, width_s) / limit


def lateness_ms(starts_and_slots_us: Sequence[tuple[int, int]]) -> list[float]:
    """How late each request started after the slot the limiter reserved for it, in ms
    (negative: early, which a reservation should never allow)."""
    return [(start - slot) / 1000 for start, slot in starts_and_slots_us]


def p99(values: Sequence[float]) -> float | None:
    return percentile(values, 99)


def commands_between(
    before: Mapping[str, int], after: Mapping[str, int], ignore: frozenset[str] = HARNESS_COMMANDS
) -> int:
    """Redis commands run between two `INFO commandstats` snapshots (command -> calls), without the
    harness's own. A command first seen in `after` counts from zero."""
    return sum(calls - before.get(name, 0) for name, calls in after.items() if name not in ignore)


def commandstats_calls(info: Mapping[str, Mapping[str, int] | object]) -> dict[str, int]:
    """redis-py's `info("commandstats")` ({"cmdstat_get": {"calls": 3, ...}}) as {"get": 3}."""
    out: dict[str, int] = {}
    for key, value in info.items():
        if key.startswith("cmdstat_") and isinstance(value, Mapping):
            out[key.removeprefix("cmdstat_")] = int(value["calls"])
    return out


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` callers over `parts` processes, the first ones taking one more when it does not divide."""
    if parts <= 0:
        raise ValueError(f"parts must be positive, got {parts}")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def pacing_interval_s(callers: int, budget_per_s: float, offered_factor: float) -> float:
    """Seconds between the starts of one caller's requests so that all callers together offer
    `offered_factor` x the budget (a caller that fell behind goes at once)."""
    if budget_per_s <= 0 or offered_factor <= 0:
        raise ValueError("budget and offered factor must be positive")
    return callers / (budget_per_s * offered_factor)


def pct(part: float, whole: float) -> float | None:
    """part / whole in %, None (n/a) when whole is zero."""
    return 100 * part / whole if whole else None


def priority_rows(
    mix: Sequence[tuple[str, int, float]],
    processes: int,
    duration_s: float,
    done: Sequence[tuple[str, int]],
    waits_ms: Sequence[tuple[str, float]],
) -> list[dict[str, object]]:
    """Per class of the priorities phase: callers, what they offered (None: as fast as let),
    admissions per second and the wait p50/p99/max in ms.

    `mix` is one process's (priority, callers, seconds between one caller's starts; 0 = at once
    again), `done` the admissions per caller, `waits_ms` every admission's wait."""
    rows: list[dict[str, object]] = []
    for priority, callers, interval_s in mix:
        waits = [ms for p, ms in waits_ms if p == priority]
        admitted = sum(n for p, n in done if p == priority)
        rows.append(
            {
                "priority": priority,
                "callers": callers * processes,
                "offered_per_s": callers * processes / interval_s if interval_s else None,
                "admitted_per_s": admitted / duration_s,
                "wait_p50_ms": percentile(waits, 50),
                "wait_p99_ms": percentile(waits, 99),
                "wait_max_ms": max(waits) if waits else None,
            }
        )
    return rows
