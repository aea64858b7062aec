"""Tests of policy/plan.py: the whole reconcile core, cycle by cycle."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from factories import T0, busy, idle, pod, raw_spec

from tars_contract import contract
from tars_operator.builders import OperatorDefaults, PoolRef
from tars_operator.models import AgentPoolStatus
from tars_operator.policy.metrics import Metrics, Sample
from tars_operator.policy.observe import PodState
from tars_operator.policy.plan import ControllerState, Plan, plan, queue_sample_time
from tars_operator.policy.scaling import Recommendation, ScaleHistory
from tars_operator.validation import check

POOL = PoolRef("researcher", "agents", "pool-uid", generation=4)
FRESH_QUEUE = Metrics(queue_depth=Sample(0, T0))


def run(
    pods: list[PodState],
    spec: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    metrics: Metrics = FRESH_QUEUE,
    state: ControllerState | None = None,
) -> Plan:
    return plan(
        POOL,
        check(spec or raw_spec()),
        status or {},
        pods,
        metrics,
        T0,
        state or ControllerState(),
        OperatorDefaults(),
    )


def current(pods: list[PodState], spec: dict[str, Any] | None = None) -> list[PodState]:
    """The pods as built from the current template (so rotation leaves them alone)."""
    digest = run([], spec=spec).creates[0].manifest["metadata"]["labels"][contract.TEMPLATE_HASH_LABEL]
    return [replace(p, template_hash=digest) for p in pods]


def conditions(p: Plan) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in p.status["conditions"]}


def test_empty_pool_creates_the_floor_with_full_status() -> None:
    p = run([])
    assert len(p.creates) == 2 and {c.replaces for c in p.creates} == {None}
    assert p.creates[0].manifest["metadata"]["labels"][contract.POOL_LABEL] == "researcher"
    assert (p.drains, p.deletes) == ((), ())
    status = dict(p.status)
    status.pop("conditions")
    assert status == {
        "observedGeneration": 4,
        "selector": "tars.dev/pool=researcher",
        "replicas": 0,
        "ready": 0,
        "warm": 0,
        "busy": 0,
        "draining": 0,
        "unschedulable": 0,
        "queueDepth": 0,
        "queueDepthSampleTime": "2025-01-01T12:00:00Z",
        "desiredReplicas": 2,
        "lastDecisionReason": "WarmFloor: desired 2 (have 0): busy 0 + warm 2",
        "lastScaleTime": "2025-01-01T12:00:00Z",
    }
    assert conditions(p) == {
        "Ready": ("False", "AgentsStarting"),
        "Scaling": ("True", "WarmFloor"),
        "MetricsAvailable": ("True", "Fresh"),
        "SpecValid": ("True", "Valid"),
        "BudgetSaturated": ("False", "NoBudget"),
    }
    assert [(e.type, e.reason) for e in p.events] == [("Warning", "AgentsStarting"), ("Normal", "ScaledUp")]


def test_expectations_stop_duplicate_creates_until_the_pods_are_seen() -> None:
    first = run([])
    state = first.expect(["researcher-aaaaa", "researcher-bbbbb"])
    again = run([], state=state)
    assert again.creates == () and conditions(again)["Scaling"][1] == "WaitingForPods"
    seen = current([pod(f"researcher-{n}", ready=False, inflight=None) for n in ("aaaaa", "bbbbb")])
    settled = run(seen, state=again.state)
    assert settled.creates == () and settled.state.expectations == ()


def test_invalid_spec_touches_no_pod() -> None:
    spec = raw_spec(rotation={"drainTimeout": "2h"})
    p = run([idle("a", phase="Failed"), idle("b")], spec=spec, metrics=Metrics())
    assert (p.creates, p.drains, p.deletes) == ((), (), ())
    assert conditions(p)["SpecValid"] == ("False", "Invalid")
    assert "spec.rotation.drainTimeout" in p.status["conditions"][0]["message"]
    assert [e.type for e in p.events] == ["Warning"]


def test_unparseable_spec_is_reported_not_raised() -> None:
    p = run([], spec={"template": {}})
    assert conditions(p)["SpecValid"] == ("False", "Invalid") and p.creates == ()


def test_scale_in_drains_idle_then_deletes_on_the_next_cycle() -> None:
    history = ScaleHistory((Recommendation(T0 - timedelta(minutes=6), 2),))
    pods = current([busy("b"), idle("i1", age=timedelta(minutes=20)), idle("i2"), idle("i3")])
    first = run(pods, state=ControllerState(history=history))
    assert [d.pod for d in first.drains] == ["i1"] and first.deletes == ()
    drained = [pods[0], replace(pods[1], draining_since=T0), *pods[2:]]
    second = run(drained, state=ControllerState(history=first.state.history))
    assert [d.pod for d in second.deletes] == ["i1"] and second.drains == ()


def test_rotation_surges_then_drains() -> None:
    old, mate = current([idle("old", age=timedelta(hours=2)), idle("mate")])
    first = run([old, mate])
    assert [(c.replaces, c.reason) for c in first.creates] == [("old", "rotation: older than ttl 0:30:00")]
    annotations = first.creates[0].manifest["metadata"]["annotations"]
    assert annotations[contract.REPLACES_ANNOTATION] == "old"
    (surge,) = current([idle("new", replaces="old")])
    second = run([old, mate, surge])
    assert second.creates == () and [d.pod for d in second.drains] == ["old"]


def test_metrics_missing_holds_and_reports() -> None:
    history = ScaleHistory((Recommendation(T0 - timedelta(minutes=6), 2),))
    pods = current([idle(f"p{i}") for i in range(6)])
    p = run(
        pods,
        metrics=Metrics(queue_depth=Sample(500, T0 - timedelta(minutes=5))),
        state=ControllerState(history),
    )
    assert (p.creates, p.drains, p.deletes) == ((), (), ()) and p.status["desiredReplicas"] == 6
    assert conditions(p)["MetricsAvailable"] == ("False", "Stale")
    assert "queueDepth" not in p.status


def test_budget_saturation_is_sticky_until_headroom() -> None:
    spec = raw_spec(rateLimit={"budget": "openai", "requestsPerMinute": 100})
    pods = current([busy("a"), busy("b")], spec)
    hot = Metrics(queue_depth=Sample(300, T0), budget_utilization=Sample(0.97, T0))
    first = run(pods, spec=spec, metrics=hot)
    assert first.creates == () and conditions(first)["BudgetSaturated"] == ("True", "BudgetExhausted")
    warm = Metrics(queue_depth=Sample(300, T0), budget_utilization=Sample(0.9, T0))
    second = run(pods, spec=spec, status=first.status, metrics=warm)
    assert second.creates == () and conditions(second)["BudgetSaturated"] == ("True", "Hysteresis")
    cool = Metrics(queue_depth=Sample(300, T0), budget_utilization=Sample(0.5, T0))
    third = run(pods, spec=spec, status=second.status, metrics=cool)
    assert len(third.creates) == 5 and conditions(third)["BudgetSaturated"] == ("False", "Headroom")
    assert ("Normal", "Headroom") in [(e.type, e.reason) for e in third.events]


def test_auto_memory_limit_goes_into_new_pods_and_status() -> None:
    spec = raw_spec(memory={"mode": "Auto"})
    oomed = idle("a", last_oom=T0 - timedelta(minutes=1), memory_limit=2**30)
    p = run([oomed], spec=spec, status={"memoryLimit": "1Gi"})
    assert p.status["memoryLimit"] == "1536Mi"
    limits = p.creates[0].manifest["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"memory": "1536Mi"}
    assert ("Warning", "MemoryLimitOOMKilled") in [(e.type, e.reason) for e in p.events]


def test_auto_memory_limit_is_resized_into_running_agents_in_place() -> None:
    spec = raw_spec(memory={"mode": "Auto"})
    oomed = idle("a", last_oom=T0 - timedelta(minutes=1), memory_limit=2**30)
    starting = idle("s", phase="Pending", ready=False, memory_limit=2**30)
    done = idle("d", memory_limit=1536 * 2**20)
    p = run(current([oomed, starting, done]), spec=spec, status={"memoryLimit": "1Gi"})
    assert [(r.pod, r.container) for r in p.resizes] == [("a", "agent")]
    assert p.resizes[0].resources == {"limits": {"memory": "1536Mi"}, "requests": {"memory": "1536Mi"}}
    assert not any(c.replaces == "a" for c in p.creates), "a new limit is no reason to rotate"
    assert any(e.reason == "Resizing" for e in p.events)


def test_recommend_mode_never_resizes() -> None:
    spec = raw_spec(memory={"mode": "Recommend"})
    oomed = idle("a", last_oom=T0 - timedelta(minutes=1), memory_limit=2**30)
    assert run(current([oomed]), spec=spec).resizes == ()


_T = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
_TEN_S = timedelta(seconds=10)


@pytest.mark.parametrize(
    ("value", "sampled_at", "prev_depth", "prev_time", "expected"),
    [
        (30.0, _T + timedelta(seconds=1), 30, _T, _T),  # the same count: unchanged
        (30.0, _T + timedelta(seconds=299), 30, _T, _T),  # ... for up to 5 minutes
        (30.0, _T + timedelta(minutes=5), 30, _T, _T + timedelta(minutes=5)),  # renewed
        (31.0, _T + timedelta(seconds=1), 30, _T, _T + timedelta(seconds=1)),  # a new count
        (30.0, _T, None, None, _T),  # the first sample
        (None, _T, 30, _T - timedelta(seconds=5), _T - timedelta(seconds=5)),  # no value: as it was
    ],
)
def test_the_queue_sample_time_moves_with_a_new_count_or_every_5_minutes(
    value: float | None,
    sampled_at: datetime,
    prev_depth: int | None,
    prev_time: datetime | None,
    expected: datetime,
) -> None:
    prev = AgentPoolStatus(queue_depth=prev_depth, queue_depth_sample_time=prev_time)
    assert queue_sample_time(value, Sample(value or 0.0, sampled_at), prev, _TEN_S, timedelta(0)) == expected


def test_pools_started_together_renew_their_queue_sample_time_spread_over_5_minutes() -> None:
    # After an operator start every pool writes its queue's sample time in the same few seconds.
    # Renewed 5 minutes after that, they all wrote their status again at once, every 5 minutes
    # (100 status writes in a burst at 100 pools); each pool's phase (by its UID) spreads them.
    pools = [PoolRef(f"p{i}", "agents", f"uid-{i}") for i in range(100)]
    status = {"queueDepth": 0, "queueDepthSampleTime": T0.strftime("%Y-%m-%dT%H:%M:%SZ")}
    spec = check(raw_spec())
    renewed_at: dict[str, timedelta] = {}
    for step in range(1, 61):  # a cycle every 10 s for 10 minutes
        now = T0 + step * _TEN_S
        for pool in pools:
            if pool.uid in renewed_at:
                continue
            metrics = Metrics(queue_depth=Sample(0, now))
            got = plan(pool, spec, status, [], metrics, now, ControllerState(), OperatorDefaults())
            if got.status["queueDepthSampleTime"] != status["queueDepthSampleTime"]:
                renewed_at[pool.uid] = now - T0
    assert len(renewed_at) == len(pools)  # each within its 5 minutes
    assert max(renewed_at.values()) <= timedelta(minutes=5)
    busiest = max(sum(1 for t in renewed_at.values() if t == s * _TEN_S) for s in range(1, 61))
    assert busiest <= 10, f"{busiest} of 100 pools renewed in the same 10 s"


_PHASE = timedelta(minutes=2)
_FIVE_MIN = timedelta(minutes=5)


@pytest.mark.parametrize(
    ("sampled_at", "prev_time", "phase", "expected"),
    [
        # The boundaries of a pool with a phase of 2 minutes: 12:02, 12:07, 12:12, ... (from the epoch).
        (_T + timedelta(seconds=119), _T, _PHASE, _T),  # before its boundary: unchanged
        (_T + timedelta(minutes=2), _T, _PHASE, _T + timedelta(minutes=2)),  # at it: renewed
        (_T + timedelta(minutes=6), _T + timedelta(minutes=2), _PHASE, _T + timedelta(minutes=2)),
        (_T + timedelta(minutes=7), _T + timedelta(minutes=2), _PHASE, _T + timedelta(minutes=7)),
        (_T + timedelta(minutes=4), _T, timedelta(0), _T),  # no phase: boundaries at 12:00, 12:05
        (_T + timedelta(minutes=5), _T, timedelta(0), _T + timedelta(minutes=5)),
        (_T - timedelta(minutes=9), _T, _PHASE, _T),  # a sample older than the time in status: kept
        # Renewed at most 5 minutes after the time in status, whatever the phase.
        (_T + _FIVE_MIN, _T, timedelta(minutes=4, seconds=59), _T + _FIVE_MIN),
        (_T + _FIVE_MIN, _T, timedelta(seconds=1), _T + _FIVE_MIN),
    ],
)
def test_the_queue_sample_time_is_renewed_at_the_pools_phase_of_each_5_minutes(
    sampled_at: datetime, prev_time: datetime, phase: timedelta, expected: datetime
) -> None:
    prev = AgentPoolStatus(queue_depth=30, queue_depth_sample_time=prev_time)
    assert queue_sample_time(30.0, Sample(30.0, sampled_at), prev, _TEN_S, phase) == expected
