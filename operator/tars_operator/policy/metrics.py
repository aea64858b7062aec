"""Metric samples and when they may be trusted.

Rule: a sample is usable when its age is within [-skew, max_age], where
max_age = 3 x scaling.interval (at least 30s: one missed scrape must not flap the pool)
and skew = one interval (Prometheus' clock and ours may differ a little). Older samples
are stale; samples from further in the future mean a clock is wrong. Either way the value
is treated as unavailable -- the callers then hold, they never guess.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class Sample:
    value: float
    at: datetime


@dataclass(frozen=True)
class MemoryUsage:
    """The pool's agents' memory over its memory.window, as Prometheus summed it up
    (queries.agent_memory_usage): the highest of the agents' p95s, the highest sample, and
    how many samples there were."""

    p95: float
    peak: float
    samples: int


@dataclass(frozen=True)
class Metrics:
    """What the shell read from Prometheus this cycle; None = the query failed or returned nothing."""

    queue_depth: Sample | None = None
    budget_utilization: Sample | None = None  # 0..1 of the budget spent in its window
    limiter_wait_seconds: Sample | None = None  # mean wait per limiter acquisition, last minute
    memory: MemoryUsage | None = None  # None: no samples, or the query failed
    queue_depth_error: str | None = None  # why queue_depth is None, when the query failed


@dataclass(frozen=True)
class Reading:
    """A usable value, or why there is none (a CamelCase reason for a condition)."""

    value: float | None
    reason: str
    message: str


MIN_MAX_AGE = timedelta(seconds=30)


def read(sample: Sample | None, now: datetime, interval: timedelta, error: str | None = None) -> Reading:
    if sample is None:
        if error:
            return Reading(None, "QueryFailed", error)
        return Reading(None, "NoData", "the query returned no series")
    age = now - sample.at
    max_age = max(3 * interval, MIN_MAX_AGE)
    if age > max_age:
        return Reading(None, "Stale", f"newest sample is {age.total_seconds():.0f}s old (limit {max_age})")
    if age < -interval:
        return Reading(
            None, "ClockSkew", f"sample is {-age.total_seconds():.0f}s in the future; check the clocks"
        )
    # Not the age itself: it differs on every read, and a status that differs is written again.
    return Reading(sample.value, "Fresh", f"sampled within the last {max_age.total_seconds():.0f}s")
