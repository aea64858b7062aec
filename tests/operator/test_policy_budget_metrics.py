"""Tests of policy/budget.py, policy/metrics.py and policy/expectations.py."""

from datetime import timedelta

import pytest
from factories import T0, pod

from tars_operator.policy.budget import assess
from tars_operator.policy.expectations import Expectation, outstanding
from tars_operator.policy.metrics import Sample, read


@pytest.mark.parametrize(
    ("has_budget", "util", "wait", "was", "saturated", "reason"),
    [
        (False, 1.0, 9.0, True, False, "NoBudget"),
        (True, 0.5, 0.1, False, False, "Headroom"),
        (True, 0.96, 0.0, False, True, "BudgetExhausted"),
        (True, 1.0, 0.0, False, True, "BudgetExhausted"),  # what a saturated budget reads
        (True, 1.04, 0.0, False, True, "BudgetExhausted"),  # a little more right after a burst
        (True, 0.5, 1.5, False, True, "BudgetExhausted"),  # limiter waits pile up
        (True, 0.90, 0.0, True, True, "Hysteresis"),  # not relieved yet
        (True, 0.90, 0.0, False, False, "Hysteresis"),
        (True, 0.80, 0.5, True, True, "Hysteresis"),  # waits still high
        (True, 0.80, 0.1, True, False, "Headroom"),  # resumes
        (True, None, None, True, False, "NoLimiterData"),  # an idle pool: saturated no more
        (True, None, None, False, False, "NoLimiterData"),
    ],
)
def test_budget(
    has_budget: bool, util: float | None, wait: float | None, was: bool, saturated: bool, reason: str
) -> None:
    verdict = assess(has_budget, util, wait, was)
    assert (verdict.saturated, verdict.reason) == (saturated, reason)


INTERVAL = timedelta(seconds=10)


@pytest.mark.parametrize(
    ("age", "value", "reason"),
    [
        (timedelta(seconds=5), 7.0, "Fresh"),
        (timedelta(seconds=30), 7.0, "Fresh"),  # one missed scrape is tolerated
        (timedelta(seconds=31), None, "Stale"),
        (-timedelta(seconds=5), 7.0, "Fresh"),  # small skew between clocks
        (-timedelta(seconds=11), None, "ClockSkew"),
    ],
)
def test_read(age: timedelta, value: float | None, reason: str) -> None:
    reading = read(Sample(7.0, T0 - age), T0, INTERVAL)
    assert (reading.value, reading.reason) == (value, reason)


def test_read_without_sample() -> None:
    assert read(None, T0, INTERVAL).reason == "NoData"


@pytest.mark.parametrize(
    ("exp", "pods", "kept"),
    [
        (Expectation("a", "create", T0), [], True),
        (Expectation("a", "create", T0), [pod("a")], False),
        (Expectation("a", "drain", T0), [pod("a")], True),
        (Expectation("a", "drain", T0), [pod("a", draining_since=T0)], False),
        (Expectation("a", "delete", T0), [pod("a")], True),
        (Expectation("a", "delete", T0), [pod("a", deleting=True)], False),
        (Expectation("a", "delete", T0), [], False),
        (Expectation("a", "create", T0 - timedelta(minutes=5)), [], False),  # expired
        (Expectation("a", "create", T0 + timedelta(seconds=30)), [], True),  # small skew
        (Expectation("a", "create", T0 + timedelta(hours=1)), [], False),  # clock went back
    ],
)
def test_expectations(exp: Expectation, pods: list, kept: bool) -> None:  # type: ignore[type-arg]
    assert outstanding([exp], pods, T0) == ((exp,) if kept else ())
