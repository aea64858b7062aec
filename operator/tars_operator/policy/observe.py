"""Observation: what each agent pod is doing, and the pool's counts.

Rule: a pod is in exactly one state, checked in this order --
finished (phase Succeeded/Failed) > terminating (deletionTimestamp set) > draining
(operator annotation) > unschedulable (Pending, PodScheduled=False/Unschedulable) >
starting (not Ready) > busy (Ready, in-flight > 0) > idle (Ready, in-flight 0) >
unknown (Ready, in-flight not reported).

Busy/idle comes from the agent's in-flight count (GET /status or the `tars_agent_busy`
gauge, whichever the shell read last); `None` means "not reported", which is never
read as idle. An agent that runs several tasks at once also reports its slots (the tasks it
may hold now): the pool's work and warm room are then counted in whole agents' worth of slots
(`Counts.load`, `Counts.warm`), so one task in 25 slots is 0.04 of an agent's work, not a busy
agent. Without slots, a busy agent is one agent's worth of work and an idle one one of room.
A rotation surge pod (annotation `tars.dev/replaces`) whose old pod is still active is not
counted as capacity, so a rotation never looks like a surplus.
"""

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tars_contract import contract
from tars_operator.units import parse_quantity


class PodPhase(enum.Enum):
    FINISHED = "finished"
    TERMINATING = "terminating"
    DRAINING = "draining"
    UNSCHEDULABLE = "unschedulable"
    STARTING = "starting"
    BUSY = "busy"
    IDLE = "idle"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class PodState:
    """What the controller knows about one agent pod (small: this is what the index holds)."""

    name: str
    uid: str
    created: datetime
    phase: str = "Running"  # the Kubernetes pod phase
    ready: bool = True
    deleting: bool = False
    draining_since: datetime | None = None
    inflight: int | None = 0
    slots: int | None = None  # the tasks the agent may hold now, as it reports (None: not reported)
    unschedulable: bool = False
    restarts: int = 0
    last_oom: datetime | None = None  # when a container last ended OOMKilled
    memory_limit: int | None = None  # bytes, of the agent container
    template_hash: str = ""
    replaces: str | None = None

    @property
    def state(self) -> PodPhase:
        if self.phase in ("Succeeded", "Failed"):
            return PodPhase.FINISHED
        if self.deleting:
            return PodPhase.TERMINATING
        if self.draining_since is not None:
            return PodPhase.DRAINING
        if self.phase == "Pending" and self.unschedulable:
            return PodPhase.UNSCHEDULABLE
        if not self.ready:
            return PodPhase.STARTING
        if self.inflight is None:
            return PodPhase.UNKNOWN
        return PodPhase.BUSY if self.inflight > 0 else PodPhase.IDLE

    @property
    def load(self) -> float:
        """The share of one agent's slots in use: 0 idle, 1 full; a busy agent without slots, 1."""
        if not self.inflight:
            return 0.0
        if not self.slots:
            return 1.0
        return min(self.inflight / self.slots, 1.0)

    @property
    def active(self) -> bool:
        """Counts toward the pool's size: neither gone, going, nor draining."""
        return self.state not in (PodPhase.FINISHED, PodPhase.TERMINATING, PodPhase.DRAINING)


_ACTIVE = (PodPhase.UNSCHEDULABLE, PodPhase.STARTING, PodPhase.BUSY, PodPhase.IDLE, PodPhase.UNKNOWN)


@dataclass(frozen=True)
class Counts:
    """The pool at a glance; `capacity` is what scaling compares with the desired count."""

    active: int
    capacity: int
    ready: int
    busy: int
    idle: int
    unknown: int
    load: float  # the ready agents' work in whole agents' worth of slots (PodState.load, summed)
    warm: int  # their free slots in whole agents' worth: idle agents, or room in busy ones
    starting: int
    unschedulable: int
    draining: int
    terminating: int
    finished: int


def surge_pods(pods: Iterable[PodState]) -> frozenset[str]:
    """Names of rotation surge pods whose old pod is still active."""
    pods = list(pods)
    active = {p.name for p in pods if p.active}
    return frozenset(p.name for p in pods if p.active and p.replaces in active)


def count(pods: Iterable[PodState]) -> Counts:
    pods = list(pods)
    by_state = {s: 0 for s in PodPhase}
    for pod in pods:
        by_state[pod.state] += 1
    active = sum(by_state[s] for s in _ACTIVE)
    reporting = [p for p in pods if p.state in (PodPhase.BUSY, PodPhase.IDLE)]
    load = sum(p.load for p in reporting)
    return Counts(
        active=active,
        capacity=active - len(surge_pods(pods)),
        ready=by_state[PodPhase.BUSY] + by_state[PodPhase.IDLE] + by_state[PodPhase.UNKNOWN],
        busy=by_state[PodPhase.BUSY],
        idle=by_state[PodPhase.IDLE],
        unknown=by_state[PodPhase.UNKNOWN],
        load=load,
        warm=_whole(len(reporting) - load),
        starting=by_state[PodPhase.STARTING],
        unschedulable=by_state[PodPhase.UNSCHEDULABLE],
        draining=by_state[PodPhase.DRAINING],
        terminating=by_state[PodPhase.TERMINATING],
        finished=by_state[PodPhase.FINISHED],
    )


def _whole(agents: float) -> int:
    """Whole agents in a sum of shares (floor; sums like 3 x 1/3 count as 1, not 0.999...)."""
    return math.floor(agents + 1e-9)


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _bytes(quantity: str | None) -> int | None:
    # Quantities we cannot read (e.g. "1e9") leave the limit unknown rather than fail the cycle.
    try:
        return parse_quantity(quantity) if quantity else None
    except ValueError:
        return None


def _condition(pod: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    for cond in pod.get("status", {}).get("conditions") or ():
        if cond.get("type") == kind:
            return dict(cond)
    return {}


def pod_state(pod: Mapping[str, Any], inflight: int | None) -> PodState:
    """Reduce a core/v1 Pod (as the API returns it) to a PodState.

    `inflight` is the agent's own report, read by the shell; the pod object cannot tell it.
    """
    meta, status = pod["metadata"], pod.get("status", {})
    annotations, labels = meta.get("annotations") or {}, meta.get("labels") or {}
    statuses = status.get("containerStatuses") or []
    ooms: list[datetime] = []
    for container in statuses:
        for state in (container.get("state") or {}, container.get("lastState") or {}):
            ended = state.get("terminated") or {}
            if ended.get("reason") == "OOMKilled" and ended.get("finishedAt"):
                ooms.append(datetime.fromisoformat(ended["finishedAt"]))
    scheduled = _condition(pod, "PodScheduled")
    containers = pod.get("spec", {}).get("containers") or [{}]
    limit = (containers[0].get("resources") or {}).get("limits", {}).get("memory")
    return PodState(
        name=meta["name"],
        uid=meta["uid"],
        created=datetime.fromisoformat(meta["creationTimestamp"]),
        phase=status.get("phase", "Pending"),
        ready=_condition(pod, "Ready").get("status") == "True",
        deleting=meta.get("deletionTimestamp") is not None,
        draining_since=_time(annotations.get(contract.DRAINING_ANNOTATION)),
        inflight=inflight,
        unschedulable=scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable",
        restarts=sum(int(s.get("restartCount", 0)) for s in statuses),
        last_oom=max(ooms, default=None),
        memory_limit=_bytes(limit),
        template_hash=labels.get(contract.TEMPLATE_HASH_LABEL, ""),
        replaces=annotations.get(contract.REPLACES_ANNOTATION),
    )
