"""The pure helpers of bench/operator_scale.py against hand-computed values."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from scale_stats import (
    bucket_delta,
    count_audit,
    cpu_percent,
    histogram_buckets,
    histogram_quantile,
    parse_proc,
    render_table,
)

# /proc/<pid>/stat of a process whose command has a space and a parenthesis: utime 250, stime 50.
STAT = "4242 (tars (operator) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 5 0 99 0 0"
STATUS = "Name:\ttars-operator\nVmPeak:\t  200000 kB\nVmRSS:\t   51200 kB\nThreads:\t5\n"


def test_parse_proc_reads_cpu_seconds_and_rss_past_a_command_with_parentheses() -> None:
    sample = parse_proc(10.0, STAT, STATUS)
    assert sample.cpu_seconds == pytest.approx(3.0)  # (250 + 50) ticks / 100
    assert sample.rss_bytes == 51200 * 1024


def test_cpu_percent_is_cpu_seconds_over_wall_seconds() -> None:
    first = parse_proc(10.0, STAT, STATUS)
    later = parse_proc(12.0, STAT.replace(" 250 50 ", " 330 70 "), STATUS)
    assert cpu_percent(first, later) == pytest.approx(50.0)  # 1 CPU s in 2 s


EXPOSITION = """# TYPE tars_operator_decision_seconds histogram
tars_operator_decision_seconds_bucket{namespace="bench",pool="a",le="0.1"} 8.0
tars_operator_decision_seconds_bucket{namespace="bench",pool="a",le="1.0"} 9.0
tars_operator_decision_seconds_bucket{namespace="bench",pool="a",le="+Inf"} 10.0
tars_operator_decision_seconds_count{namespace="bench",pool="a"} 10.0
tars_operator_decision_seconds_sum{namespace="bench",pool="a"} 5.0
tars_operator_decision_seconds_bucket{namespace="bench",pool="b",le="0.1"} 2.0
tars_operator_decision_seconds_bucket{namespace="bench",pool="b",le="1.0"} 10.0
tars_operator_decision_seconds_bucket{namespace="bench",pool="b",le="+Inf"} 10.0
tars_operator_decision_seconds_count{namespace="bench",pool="b"} 10.0
tars_operator_decision_seconds_sum{namespace="bench",pool="b"} 5.0
tars_operator_decision_seconds_bucket{namespace="other",pool="c",le="0.1"} 100.0
tars_operator_decision_seconds_bucket{namespace="other",pool="c",le="1.0"} 100.0
tars_operator_decision_seconds_bucket{namespace="other",pool="c",le="+Inf"} 100.0
"""


def test_histogram_buckets_sum_the_series_that_match_the_labels() -> None:
    buckets = histogram_buckets(EXPOSITION, "tars_operator_decision_seconds", {"namespace": "bench"})
    assert buckets == {0.1: 10.0, 1.0: 19.0, float("inf"): 20.0}


def test_histogram_quantile_interpolates_within_the_bucket_like_promql() -> None:
    buckets = {0.1: 10.0, 1.0: 19.0, float("inf"): 20.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)  # rank 10: the top of the first bucket
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)  # rank 5 of 10 in [0, 0.1]
    assert histogram_quantile(0.99, buckets) == pytest.approx(1.0)  # rank 19.8: in +Inf -> highest bound
    assert histogram_quantile(0.99, {0.1: 0.0, float("inf"): 0.0}) is None


def test_bucket_delta_counts_only_what_was_observed_between_scrapes() -> None:
    before = {0.1: 10.0, 1.0: 19.0, float("inf"): 20.0}
    after = {0.1: 110.0, 1.0: 119.0, float("inf"): 121.0}
    assert bucket_delta(before, after) == {0.1: 100.0, 1.0: 100.0, float("inf"): 101.0}


def _event(user: str, verb: str, stage: str, resource: str = "pods", sub: str | None = None) -> str:
    ref = {"resource": resource, **({"subresource": sub} if sub else {})}
    return json.dumps({"user": {"username": user}, "verb": verb, "stage": stage, "objectRef": ref})


def test_count_audit_counts_each_request_of_the_user_once_and_its_status_writes() -> None:
    lines = [
        _event("tars-operator", "create", "ResponseComplete"),
        _event("tars-operator", "patch", "ResponseComplete", "agentpools", "status"),
        _event("tars-operator", "patch", "ResponseComplete", "pods"),
        _event("tars-operator", "watch", "ResponseStarted"),
        _event("tars-operator", "watch", "ResponseComplete"),  # the same watch, ending
        _event("kwok", "patch", "ResponseComplete", "agentpools", "status"),
        "",
    ]
    counted = count_audit(lines, "tars-operator")
    assert counted.requests == 4
    assert counted.status_writes == 1
    assert dict(counted.by_verb) == {"create": 1, "patch": 2, "watch": 1}


def test_render_table_aligns_columns() -> None:
    text = render_table(["mode", "p99"], [["a", "0.1"], ["longer", "10.25"]])
    assert text.splitlines() == ["mode      p99", "------  -----", "a         0.1", "longer  10.25"]
