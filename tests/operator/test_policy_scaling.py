"""Table-driven tests of policy/scaling.py."""

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from factories import T0, busy, idle, pod, spec

from tars_operator.policy.observe import PodState, count
from tars_operator.policy.scaling import Recommendation, ScaleHistory, decide

WINDOW = timedelta(minutes=5)


def covered(replicas: int) -> ScaleHistory:
    """A history that covers the window with one old recommendation."""
    return ScaleHistory((Recommendation(T0 - WINDOW - timedelta(seconds=1), replicas),))


@dataclass
class Case:
    name: str
    pods: list[PodState]
    queue: float | None = 0.0
    overrides: dict[str, Any] = field(default_factory=dict)
    history: ScaleHistory = field(default_factory=lambda: covered(0))
    saturated: bool = False
    recent: int = 0
    pending: int = 0
    desired: int = 0
    create: int = 0
    remove: int = 0
    reason: str = ""


CASES = [
    Case("empty pool gets warm floor", [], desired=2, create=2, reason="WarmFloor"),
    Case("min above busy+warm", [], overrides={"replicas": {"min": 4}}, desired=4, create=4, reason="AtMin"),
    Case("stable", [idle("a"), idle("b")], desired=2, reason="WarmFloor"),
    Case("warm floor when all busy", [busy("a"), busy("b")], desired=4, create=2, reason="WarmFloor"),
    # Agents that run several tasks at once: warm is their free slots, counted in whole agents. At
    # 1 task in 25 slots each, 4 agents hold 0.16 agents' worth of work and 3.84 of warm room: one
    # more agent keeps the floor of 2 (counting them busy would grow the pool to 4 + 2, and at
    # that size every agent takes a task again: to replicas.max).
    Case(
        "agents with free slots are warm capacity",
        [busy(f"p{i}", slots=25) for i in range(4)],
        overrides={"warm": {"min": 4}},
        desired=5,
        create=1,
        reason="WarmFloor",
    ),
    Case(
        "a busy agent is kept though its work would fit elsewhere",
        [busy(f"p{i}", slots=25) for i in range(5)],
        overrides={"warm": {"min": 2}},
        desired=5,
        reason="WarmFloor",
    ),
    Case(
        "full agents are busy agents",
        [busy(f"p{i}", inflight=25, slots=25) for i in range(3)] + [idle("q", slots=25)],
        desired=5,
        create=1,
        reason="WarmFloor",
    ),
    Case(
        "an agent that does not report its slots is a busy agent when it works",
        [busy("a"), busy("b", slots=25)],
        desired=4,
        create=2,
        reason="WarmFloor",
    ),
    Case(
        "max reached",
        [busy(f"p{i}") for i in range(9)],
        desired=10,
        create=1,
        reason="AtMax",
    ),
    Case(
        "queue above threshold adds one agent per targetPerAgent",
        [idle("a"), idle("b")],
        queue=71,
        desired=5,
        create=3,
        reason="QueueAboveThreshold",
    ),
    Case("queue at threshold adds nothing", [idle("a"), idle("b")], queue=50, desired=2, reason="WarmFloor"),
    Case(
        "spawn rate limited",
        [],
        queue=200,
        recent=4,
        desired=10,
        create=1,
        reason="SpawnRateLimited",
    ),
    Case("spawn budget used up", [], queue=200, recent=5, desired=10, create=0, reason="SpawnRateLimited"),
    Case("pending creations block creates", [], pending=2, desired=2, create=0, reason="WaitingForPods"),
    Case(
        "unschedulable pods are not replaced again",
        [pod("u", phase="Pending", ready=False, unschedulable=True, inflight=None)],
        queue=100,
        desired=7,
        create=0,
        reason="Unschedulable",
    ),
    Case(
        "budget saturated: no growth",
        [busy("a"), busy("b")],
        queue=200,
        saturated=True,
        desired=2,
        reason="BudgetSaturated",
    ),
    Case(
        "budget saturated still honours min",
        [],
        overrides={"replicas": {"min": 3}},
        saturated=True,
        desired=3,
        create=3,
        reason="AtMin",
    ),
    Case(
        "scale-down after a covered window",
        [idle(f"p{i}") for i in range(6)],
        desired=2,
        remove=4,
        reason="WarmFloor",
    ),
    Case(
        "scale-down waits for the highest recommendation in the window",
        [idle(f"p{i}") for i in range(6)],
        history=ScaleHistory((Recommendation(T0 - WINDOW, 5), Recommendation(T0 - timedelta(minutes=1), 4))),
        desired=5,
        remove=1,
        reason="ScaleDownStabilizing",
    ),
    Case(
        "no scale-down without a full window of history (restart)",
        [idle(f"p{i}") for i in range(6)],
        history=ScaleHistory(),
        desired=6,
        reason="ScaleDownStabilizing",
    ),
    Case(
        "clock jumped backwards: history discarded, no scale-down",
        [idle(f"p{i}") for i in range(6)],
        history=ScaleHistory((Recommendation(T0 + timedelta(hours=1), 2),)),
        desired=6,
        reason="ScaleDownStabilizing",
    ),
    Case(
        "clock jumped forwards: the entry in force at the window start still counts",
        [idle(f"p{i}") for i in range(6)],
        history=ScaleHistory((Recommendation(T0 - timedelta(days=1), 6),)),
        desired=6,
        reason="ScaleDownStabilizing",
    ),
    Case(
        "clock jumped forwards: scale-in one window later",
        [idle(f"p{i}") for i in range(6)],
        history=ScaleHistory((Recommendation(T0 - timedelta(days=1), 6), Recommendation(T0 - WINDOW, 2))),
        desired=2,
        remove=4,
    ),
    Case(
        "metrics missing, Hold keeps the size",
        [idle(f"p{i}") for i in range(6)],
        queue=None,
        desired=6,
        reason="MetricsUnavailableHold",
    ),
    Case(
        "metrics missing, Hold still keeps the warm floor",
        [busy("a")],
        queue=None,
        desired=3,
        create=2,
        reason="MetricsUnavailableHold",
    ),
    Case(
        "metrics missing, UseMin drifts to the floor through the window",
        [idle(f"p{i}") for i in range(6)],
        queue=None,
        overrides={"scaling": {"onMetricsUnavailable": "UseMin"}},
        desired=2,
        remove=4,
        reason="MetricsUnavailableUseMin",
    ),
    Case(
        "metrics missing, UseMin never cuts without a window",
        [idle(f"p{i}") for i in range(6)],
        queue=None,
        overrides={"scaling": {"onMetricsUnavailable": "UseMin"}},
        history=ScaleHistory(),
        desired=6,
        reason="ScaleDownStabilizing",
    ),
    Case(
        "unknown busy state blocks scale-in",
        [idle(f"p{i}") for i in range(5)] + [pod("u", inflight=None)],
        desired=2,
        reason="AgentStatusUnknown",
    ),
    Case(
        "max lowered below the size shrinks at once",
        [idle(f"p{i}") for i in range(6)],
        overrides={"replicas": {"max": 3}},
        history=ScaleHistory(),
        desired=3,
        remove=3,
    ),
    Case(
        "rotation surge pods are not capacity",
        [idle("a"), idle("b"), pod("r", ready=False, inflight=None, replaces="a")],
        desired=2,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_decide(case: Case) -> None:
    decision = decide(
        spec(**case.overrides),
        count(case.pods),
        case.queue,
        case.saturated,
        case.history,
        case.recent,
        case.pending,
        T0,
    )
    assert (decision.desired, decision.create, decision.remove) == (case.desired, case.create, case.remove)
    if case.reason:
        assert decision.reason == case.reason, decision.message


def test_history_keeps_the_window_and_one_entry_before_it() -> None:
    history = ScaleHistory(tuple(Recommendation(T0 - timedelta(minutes=m), 3) for m in (9, 7, 4, 1)))
    decision = decide(spec(), count([idle("a"), idle("b")]), 0, False, history, 0, 0, T0)
    assert [r.at for r in decision.history.entries] == [
        T0 - timedelta(minutes=7),
        T0 - timedelta(minutes=4),
        T0 - timedelta(minutes=1),
        T0,
    ]
