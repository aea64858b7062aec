"""The pure helpers of bench/limiter_bench.py against hand-computed tables."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from limiter_stats import fmt, in_window, peak_in_window, per_second, percentile, ratio, render_table

TEN = [float(v) for v in range(1, 11)]  # 1..10


@pytest.mark.parametrize(
    ("values", "p", "expected"),
    [
        (TEN, 50, 5.0),  # rank ceil(0.5 * 10) = 5
        (TEN, 95, 10.0),  # rank ceil(9.5) = 10
        (TEN, 10, 1.0),
        (TEN, 11, 2.0),  # rank ceil(1.1) = 2: nearest rank never interpolates
        (TEN, 100, 10.0),
        ([3.0, 1.0, 2.0], 50, 2.0),  # unsorted input
        ([7.0], 99, 7.0),
        ([float(v) for v in range(1, 201)], 99, 198.0),  # rank ceil(198.0) = 198
        ([float(v) for v in range(1, 101)], 7, 7.0),  # 0.07 * 100 is 7.000000000000001 in floats
    ],
)
def test_percentile_nearest_rank(values: list[float], p: float, expected: float) -> None:
    assert percentile(values, p) == expected


def test_percentile_edges() -> None:
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(TEN, 0)
    with pytest.raises(ValueError):
        percentile(TEN, 101)


@pytest.mark.parametrize(
    ("times", "width", "expected"),
    [
        ([], 1.0, 0),
        ([5.0], 1.0, 1),
        # [0, 1) holds 0, 0.5, 0.99; 1.0 is outside the half-open window
        ([0.0, 0.5, 0.99, 1.0], 1.0, 3),
        # [0.5, 1.5) holds 0.5, 0.99, 1.0, 1.2
        ([0.0, 0.5, 0.99, 1.0, 1.2, 2.6], 1.0, 4),
        # unsorted, with a burst at the end: [10, 11) holds four
        ([10.9, 0.0, 10.0, 3.0, 10.1, 10.5], 1.0, 4),
        # a minute: 0..59 in, 60 starts the next window
        ([float(t) for t in range(0, 121)], 60.0, 60),
        ([1.0, 1.0, 1.0], 0.5, 3),  # simultaneous events
    ],
)
def test_peak_in_window(times: list[float], width: float, expected: int) -> None:
    assert peak_in_window(times, width) == expected


def test_peak_in_window_rejects_empty_width() -> None:
    with pytest.raises(ValueError):
        peak_in_window([1.0], 0)


def test_per_second_buckets() -> None:
    start = 100.0
    times = [99.9, 100.0, 100.4, 100.999, 101.0, 102.5, 103.0, 104.2]
    # before start and at/after start + seconds are dropped
    assert per_second(times, start, 3) == [3, 1, 1]
    assert per_second([], start, 2) == [0, 0]


def test_in_window_is_half_open() -> None:
    assert in_window([1.0, 2.0, 2.5, 3.0], 2.0, 3.0) == [2.0, 2.5]


def test_ratio_and_fmt() -> None:
    assert ratio(1, 4) == 0.25
    assert ratio(1, 0) is None
    assert fmt(None) == "n/a"
    assert fmt(2.345, 2) == "2.35"
    assert fmt(9.5) == "9.5"


def test_render_table() -> None:
    text = render_table(["scenario", "n"], [["naive", "10"], ["shared-limiter", "9"]])
    assert text.splitlines() == [
        "scenario         n",
        "--------------  --",
        "naive           10",
        "shared-limiter   9",
    ]
