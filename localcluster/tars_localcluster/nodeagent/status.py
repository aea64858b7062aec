"""Pure functions from the node agent's view of a pod to the pod's `.status`."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]


def rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Termination:
    exit_code: int
    reason: str  # Completed, Error, OOMKilled
    started_at: dt.datetime
    finished_at: dt.datetime
    signal: int | None = None
    message: str = ""

    def to_api(self) -> JSON:
        out: JSON = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": rfc3339(self.started_at),
            "finishedAt": rfc3339(self.finished_at),
        }
        if self.signal is not None:
            out["signal"] = self.signal
        if self.message:
            out["message"] = self.message
        return out


@dataclass
class ContainerView:
    """What the node agent knows about one container."""

    name: str
    image: str
    restart_count: int = 0
    running_since: dt.datetime | None = None
    terminated: Termination | None = None
    last_terminated: Termination | None = None
    waiting_reason: str = "ContainerCreating"
    waiting_message: str = ""
    ready: bool = False
    will_restart: bool = True
    pid: int | None = None
    memory_limit: int | None = None

    def state_api(self) -> JSON:
        if self.running_since is not None:
            return {"running": {"startedAt": rfc3339(self.running_since)}}
        if self.terminated is not None and not self.will_restart:
            return {"terminated": self.terminated.to_api()}
        waiting: JSON = {"reason": self.waiting_reason}
        if self.waiting_message:
            waiting["message"] = self.waiting_message
        return {"waiting": waiting}

    def to_api(self) -> JSON:
        out: JSON = {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "containerID": f"tars-local://{self.pid}" if self.pid else "",
            "restartCount": self.restart_count,
            "ready": self.ready and self.running_since is not None,
            "started": self.running_since is not None,
            "state": self.state_api(),
            "lastState": {},
        }
        # A container waiting to be restarted shows its termination as lastState.
        waiting_to_restart = self.running_since is None and self.terminated is not None and self.will_restart
        last = self.terminated if waiting_to_restart else self.last_terminated
        if last is not None:
            out["lastState"] = {"terminated": last.to_api()}
        if self.memory_limit is not None:
            out["resources"] = {"limits": {"memory": str(self.memory_limit)}}
        return out


@dataclass
class PodView:
    host_ip: str
    pod_ip: str | None
    start_time: dt.datetime
    containers: list[ContainerView]
    init_containers: list[ContainerView] = field(default_factory=list)
    initialized: bool = False
    sandbox_ready: bool = False
    message: str = ""
    reason: str = ""


def phase(view: PodView) -> str:
    cs = view.containers
    if not view.initialized:
        if any(
            c.terminated and not c.will_restart and c.terminated.exit_code != 0 for c in view.init_containers
        ):
            return "Failed"
        return "Pending"
    if any(c.running_since is not None for c in cs):
        return "Running"
    finished = [c for c in cs if c.terminated is not None and not c.will_restart]
    if len(finished) == len(cs):
        return (
            "Succeeded" if all(c.terminated and c.terminated.exit_code == 0 for c in finished) else "Failed"
        )
    if any(c.terminated is not None or c.restart_count > 0 for c in cs):
        # Between restarts (back-off): the pod has run, so it is Running, as the kubelet reports.
        return "Running"
    return "Pending"


def _condition(kind: str, ok: bool, previous: dict[str, JSON], now: dt.datetime, reason: str = "") -> JSON:
    status = "True" if ok else "False"
    before = previous.get(kind)
    since = before["lastTransitionTime"] if before and before.get("status") == status else rfc3339(now)
    cond: JSON = {"type": kind, "status": status, "lastTransitionTime": since, "lastProbeTime": None}
    if reason and not ok:
        cond["reason"] = reason
    return cond


def pod_status(view: PodView, previous_conditions: list[JSON], now: dt.datetime) -> JSON:
    previous = {c["type"]: c for c in previous_conditions}
    all_ready = bool(view.containers) and all(
        c.ready and c.running_since is not None for c in view.containers
    )
    conditions = [
        _condition("PodReadyToStartContainers", view.sandbox_ready, previous, now),
        _condition("Initialized", view.initialized, previous, now, "ContainersNotInitialized"),
        _condition("ContainersReady", all_ready, previous, now, "ContainersNotReady"),
        _condition("Ready", all_ready, previous, now, "ContainersNotReady"),
    ]
    status: JSON = {
        "phase": phase(view),
        "hostIP": view.host_ip,
        "hostIPs": [{"ip": view.host_ip}],
        "startTime": rfc3339(view.start_time),
        "conditions": conditions,
        "containerStatuses": [c.to_api() for c in view.containers],
    }
    if view.init_containers:
        status["initContainerStatuses"] = [c.to_api() for c in view.init_containers]
    if view.pod_ip:
        status["podIP"] = view.pod_ip
        status["podIPs"] = [{"ip": view.pod_ip}]
    if view.message:
        status["message"] = view.message
    if view.reason:
        status["reason"] = view.reason
    return status
