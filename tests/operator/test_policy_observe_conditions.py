"""Tests of policy/observe.py and policy/conditions.py."""

from datetime import timedelta
from typing import Any

import pytest
from factories import T0, busy, idle, pod

from tars_contract import contract
from tars_operator.models import AgentPoolStatus, Condition
from tars_operator.policy.conditions import Verdict, merge, patch
from tars_operator.policy.observe import PodPhase, PodState, count, pod_state


@pytest.mark.parametrize(
    ("state", "phase"),
    [
        (pod("a", phase="Failed", deleting=True), PodPhase.FINISHED),
        (pod("a", deleting=True, draining_since=T0), PodPhase.TERMINATING),
        (busy("a", draining_since=T0), PodPhase.DRAINING),
        (pod("a", phase="Pending", ready=False, unschedulable=True), PodPhase.UNSCHEDULABLE),
        (pod("a", ready=False, inflight=3), PodPhase.STARTING),
        (busy("a"), PodPhase.BUSY),
        (idle("a"), PodPhase.IDLE),
        (pod("a", inflight=None), PodPhase.UNKNOWN),
    ],
)
def test_each_pod_has_one_state(state: PodState, phase: PodPhase) -> None:
    assert state.state is phase


def test_count() -> None:
    pods = [
        busy("b1"),
        busy("b2"),
        idle("i1"),
        pod("u", inflight=None),
        pod("s", ready=False, replaces="i1"),
        pod("d", draining_since=T0),
        pod("t", deleting=True),
        pod("f", phase="Succeeded"),
    ]
    c = count(pods)
    assert (c.active, c.capacity, c.ready, c.busy, c.idle, c.unknown, c.starting) == (5, 4, 4, 2, 1, 1, 1)
    assert (c.draining, c.terminating, c.finished, c.unschedulable) == (1, 1, 1, 0)
    assert (c.load, c.warm) == (2.0, 1)  # without slots: a busy agent is one agent's work


@pytest.mark.parametrize(
    ("pods", "load", "warm"),
    [
        ([busy(f"p{i}", slots=25) for i in range(4)], 0.16, 3),  # 3.84 agents' worth of room
        ([busy("a", inflight=10, slots=20), busy("b", inflight=10, slots=20)], 1.0, 1),
        ([busy("a", inflight=30, slots=25), idle("b", slots=25)], 1.0, 1),  # over its slots: full
        ([busy("a", slots=3), busy("b", slots=3), busy("c", slots=3)], 1.0, 2),  # 3 x 2/3 is 2
        ([busy("a", slots=25), pod("u", inflight=None, slots=25), pod("s", ready=False)], 0.04, 0),
    ],
)
def test_agents_with_several_slots_count_their_free_slots_as_warm(
    pods: list[PodState], load: float, warm: int
) -> None:
    c = count(pods)
    assert (round(c.load, 9), c.warm) == (load, warm)


def test_pod_state_from_api_object() -> None:
    raw: dict[str, Any] = {
        "metadata": {
            "name": "researcher-abcde",
            "uid": "u1",
            "creationTimestamp": "2025-01-01T11:00:00Z",
            "labels": {contract.TEMPLATE_HASH_LABEL: "h1"},
            "annotations": {
                contract.DRAINING_ANNOTATION: "2025-01-01T11:59:00Z",
                contract.REPLACES_ANNOTATION: "researcher-old",
            },
        },
        "spec": {"containers": [{"name": "agent", "resources": {"limits": {"memory": "512Mi"}}}]},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [
                {
                    "restartCount": 2,
                    "lastState": {
                        "terminated": {"reason": "OOMKilled", "finishedAt": "2025-01-01T11:30:00Z"}
                    },
                }
            ],
        },
    }
    assert pod_state(raw, inflight=0) == PodState(
        name="researcher-abcde",
        uid="u1",
        created=T0 - timedelta(hours=1),
        phase="Running",
        ready=True,
        deleting=False,
        draining_since=T0 - timedelta(minutes=1),
        inflight=0,
        unschedulable=False,
        restarts=2,
        last_oom=T0 - timedelta(minutes=30),
        memory_limit=512 * 2**20,
        template_hash="h1",
        replaces="researcher-old",
    )


def test_pod_state_unschedulable_pending_pod() -> None:
    raw: dict[str, Any] = {
        "metadata": {"name": "p", "uid": "u", "creationTimestamp": "2025-01-01T12:00:00Z"},
        "status": {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}],
        },
    }
    state = pod_state(raw, inflight=None)
    assert state.state is PodPhase.UNSCHEDULABLE and state.memory_limit is None and state.last_oom is None


def _cond(kind: str, status: str, at_minutes_ago: int) -> Condition:
    return Condition(
        type=kind,
        status=status,  # type: ignore[arg-type]
        reason="Old",
        message="old",
        last_transition_time=T0 - timedelta(minutes=at_minutes_ago),
        observed_generation=1,
    )


def test_merge_keeps_transition_time_when_status_is_unchanged() -> None:
    previous = [
        _cond("Ready", "True", 10),
        _cond("MetricsAvailable", "True", 10),
        _cond("Foreign", "True", 3),
    ]
    merged = merge(
        previous,
        [
            Verdict("Ready", "True", "AgentsReady", "3 of 3"),
            Verdict("MetricsAvailable", "False", "Stale", "old"),
        ],
        T0 + timedelta(microseconds=5),
        2,
    )
    assert [(c.type, c.status, c.reason, c.last_transition_time, c.observed_generation) for c in merged] == [
        ("Ready", "True", "AgentsReady", T0 - timedelta(minutes=10), 2),
        ("MetricsAvailable", "False", "Stale", T0, 2),
        ("Foreign", "True", "Old", T0 - timedelta(minutes=3), 1),
    ]


def test_patch_is_camel_case_and_omits_unset_fields() -> None:
    status = AgentPoolStatus(replicas=2, memory_limit="512Mi", last_scale_time=T0)
    assert patch(status) == {
        "replicas": 2,
        "memoryLimit": "512Mi",
        "lastScaleTime": "2025-01-01T12:00:00Z",
        "conditions": [],
    }
