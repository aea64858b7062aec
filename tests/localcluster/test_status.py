"""The node agent's pure pod-status builder."""

from __future__ import annotations

import datetime as dt

import pytest

from tars_localcluster.nodeagent.status import ContainerView, PodView, Termination, phase, pod_status

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(seconds=5)


def term(code: int, reason: str = "") -> Termination:
    return Termination(
        exit_code=code,
        reason=reason or ("Completed" if code == 0 else "Error"),
        started_at=T0,
        finished_at=T1,
    )


def view(*containers: ContainerView, initialized: bool = True) -> PodView:
    return PodView(
        host_ip="10.244.0.1",
        pod_ip="10.244.0.5",
        start_time=T0,
        containers=list(containers),
        initialized=initialized,
        sandbox_ready=True,
    )


@pytest.mark.parametrize(
    ("containers", "expected"),
    [
        ([ContainerView("a", "i")], "Pending"),
        ([ContainerView("a", "i", running_since=T0)], "Running"),
        ([ContainerView("a", "i", terminated=term(0), will_restart=False)], "Succeeded"),
        ([ContainerView("a", "i", terminated=term(1), will_restart=False)], "Failed"),
        (
            [
                ContainerView("a", "i", terminated=term(0), will_restart=False),
                ContainerView("b", "i", terminated=term(2), will_restart=False),
            ],
            "Failed",
        ),
        # Waiting out a restart back-off after a crash is still Running, as the kubelet reports.
        ([ContainerView("a", "i", terminated=term(137, "OOMKilled"), will_restart=True)], "Running"),
    ],
)
def test_phase(containers: list[ContainerView], expected: str) -> None:
    assert phase(view(*containers)) == expected


def test_uninitialized_pod_is_pending_or_failed() -> None:
    init_failed = view(ContainerView("a", "i"), initialized=False)
    init_failed.init_containers = [ContainerView("init", "i", terminated=term(1), will_restart=False)]
    assert phase(init_failed) == "Failed"
    assert phase(view(ContainerView("a", "i"), initialized=False)) == "Pending"


def test_ready_only_when_every_container_runs_and_is_ready() -> None:
    running = ContainerView("a", "i", running_since=T0, ready=True)
    not_ready = ContainerView("b", "i", running_since=T0, ready=False)
    status = pod_status(view(running, not_ready), [], T1)
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {
        "PodReadyToStartContainers": "True",
        "Initialized": "True",
        "ContainersReady": "False",
        "Ready": "False",
    }
    not_ready.ready = True
    assert {c["type"]: c["status"] for c in pod_status(view(running, not_ready), [], T1)["conditions"]}[
        "Ready"
    ] == "True"


def test_transition_time_kept_while_status_unchanged() -> None:
    c = ContainerView("a", "i", running_since=T0, ready=True)
    first = pod_status(view(c), [], T0)["conditions"]
    later = pod_status(view(c), first, T1)["conditions"]
    assert first == later
    c.ready = False
    changed = {x["type"]: x for x in pod_status(view(c), later, T1)["conditions"]}
    assert changed["Ready"]["lastTransitionTime"] == "2026-01-01T00:00:05Z"


def test_restarting_container_reports_last_termination() -> None:
    oom = term(137, "OOMKilled")
    waiting = ContainerView("a", "i", restart_count=0, terminated=oom, waiting_reason="CrashLoopBackOff")
    status = waiting.to_api()
    assert status["state"] == {"waiting": {"reason": "CrashLoopBackOff"}}
    assert status["lastState"]["terminated"]["reason"] == "OOMKilled"
    restarted = ContainerView("a", "i", restart_count=1, running_since=T1, last_terminated=oom)
    assert restarted.to_api()["lastState"]["terminated"]["exitCode"] == 137
    final = ContainerView("a", "i", terminated=oom, will_restart=False)
    assert final.to_api()["state"]["terminated"]["reason"] == "OOMKilled"
    assert final.to_api()["lastState"] == {}
