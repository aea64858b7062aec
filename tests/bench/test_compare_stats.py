"""The pure helpers of bench/limiter_compare.py against hand-computed tables."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from compare_stats import (
    commands_between,
    commandstats_calls,
    jain,
    lateness_ms,
    pacing_interval_s,
    pct,
    priority_rows,
    split_evenly,
    worst_window_ratio,
)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([5.0, 5.0, 5.0, 5.0], 1.0),  # all equal
        ([8.0, 0.0, 0.0, 0.0], 0.25),  # one gets everything: 1/n
        ([1.0, 3.0], 0.8),  # 16 / (2 * 10)
        ([2.0, 2.0, 0.0, 0.0], 0.5),  # half starve: 16 / (4 * 8)
        ([7.0], 1.0),
    ],
)
def test_jain(values: list[float], expected: float) -> None:
    assert jain(values) == pytest.approx(expected)


def test_jain_is_undefined_when_nobody_got_anything() -> None:
    assert jain([]) is None
    assert jain([0.0, 0.0]) is None


@pytest.mark.parametrize(
    ("times", "width", "limit", "expected"),
    [
        # [0, 1) holds 0, 0.2, 0.9 (1.0 is outside the half-open window): 3 of a limit of 2
        ([0.0, 0.2, 0.9, 1.0], 1.0, 2.0, 1.5),
        # spread out: never more than one a second
        ([0.0, 1.0, 2.0, 3.0], 1.0, 1.0, 1.0),
        # a 60 s window over a short run holds the whole run
        ([0.0, 5.0, 10.0, 29.9], 60.0, 600.0, 4 / 600),
        # the worst window starts at an event, not at a whole second: [0.5, 1.5) holds 4
        ([0.0, 0.5, 0.99, 1.0, 1.2, 2.6], 1.0, 4.0, 1.0),
    ],
)
def test_worst_window_ratio(times: list[float], width: float, limit: float, expected: float) -> None:
    assert worst_window_ratio(times, width, limit) == pytest.approx(expected)


def test_worst_window_ratio_edges() -> None:
    assert worst_window_ratio([], 1.0, 10.0) is None
    with pytest.raises(ValueError):
        worst_window_ratio([1.0], 1.0, 0.0)


def test_lateness_is_start_minus_slot_in_ms() -> None:
    # started 1.5 ms after its slot, exactly on it, 0.25 ms before it (a reservation bug to show)
    assert lateness_ms([(10_001_500, 10_000_000), (7, 7), (999_750, 1_000_000)]) == [1.5, 0.0, -0.25]


def test_commands_between_snapshots_leaves_out_the_harness() -> None:
    before = {"evalsha": 10, "get": 4, "info": 3}
    after = {"evalsha": 25, "get": 4, "info": 9, "flushall": 1, "set": 2}
    # evalsha +15, set new +2; info and flushall are the harness's own
    assert commands_between(before, after) == 17
    assert commands_between({}, {"info": 5, "config|resetstat": 1}) == 0


def test_commandstats_calls_reads_redis_py_info() -> None:
    info = {
        "cmdstat_evalsha": {"calls": 12, "usec": 300, "usec_per_call": 25.0},
        "cmdstat_client|setinfo": {"calls": 2, "usec": 1},
        "errorstat_ERR": {"count": 1},
    }
    assert commandstats_calls(info) == {"evalsha": 12, "client|setinfo": 2}


@pytest.mark.parametrize(
    ("total", "parts", "expected"),
    [(64, 4, [16, 16, 16, 16]), (64, 64, [1] * 64), (10, 4, [3, 3, 2, 2]), (3, 1, [3])],
)
def test_split_evenly(total: int, parts: int, expected: list[int]) -> None:
    assert split_evenly(total, parts) == expected
    assert sum(expected) == total


def test_pacing_offers_the_factor_of_the_budget() -> None:
    # 64 callers at 2x a 10/s budget: each starts a request every 3.2 s, 20/s in all
    interval = pacing_interval_s(64, 10.0, 2.0)
    assert interval == pytest.approx(3.2)
    assert 64 / interval == pytest.approx(20.0)
    with pytest.raises(ValueError):
        pacing_interval_s(1, 0.0, 2.0)


def test_pct() -> None:
    assert pct(1, 4) == 25.0
    assert pct(3, 0) is None


def test_priority_rows_sum_each_class_over_all_processes() -> None:
    mix = (("critical", 1, 8.0), ("low", 2, 0.0))
    done = [("critical", 3), ("low", 10), ("low", 0), ("critical", 1), ("low", 5), ("low", 5)]
    waits = [("critical", 100.0), ("critical", 300.0), ("low", 2000.0), ("critical", 200.0), ("low", 50.0)]
    rows = priority_rows(mix, 2, 10.0, done, waits)
    assert rows == [
        {
            "priority": "critical",
            "callers": 2,
            "offered_per_s": 0.25,  # 2 callers, one start each every 8 s
            "admitted_per_s": 0.4,
            "wait_p50_ms": 200.0,
            "wait_p99_ms": 300.0,
            "wait_max_ms": 300.0,
        },
        {
            "priority": "low",
            "callers": 4,
            "offered_per_s": None,  # as fast as let: saturating
            "admitted_per_s": 2.0,
            "wait_p50_ms": 50.0,
            "wait_p99_ms": 2000.0,
            "wait_max_ms": 2000.0,
        },
    ]


def test_priority_rows_report_a_class_that_got_nothing() -> None:
    rows = priority_rows((("low", 3, 0.0),), 1, 5.0, [("low", 0)] * 3, [])
    assert rows[0]["admitted_per_s"] == 0.0
    assert rows[0]["wait_p99_ms"] is None and rows[0]["wait_max_ms"] is None
