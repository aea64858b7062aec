"""Scale-in: which surplus pods go, and the two-phase drain handshake.

Rule: only pods doing no work are chosen -- never a busy pod, never a ready pod whose
in-flight count is unknown, never a rotation surge pod whose old pod is still there.
Order of preference:
  1. unschedulable pods, then Pending pods (never ran: deleted at once, nothing to drain);
  2. started but not-ready pods (drained: a failing readiness probe does not prove idleness);
  3. idle ready pods, oldest first -- the oldest is nearest its TTL, so removing it also
     saves a rotation; ties broken by name, so a repeated cycle picks the same pod.
Drain handshake: phase 1 marks the pod draining (annotation + POST /drain, the agent stops
pulling work); phase 2, on a later cycle, deletes it once it reports 0 in flight -- the
re-check closes the race with a task taken just before the drain -- or once
`rotation.drainTimeout` has passed since the drain began (a backwards clock jump
lengthens that wait, it never shortens it). Pods that finished (Succeeded/Failed) are
deleted as they are found.
"""

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from tars_operator.policy.actions import Delete, Drain
from tars_operator.policy.observe import PodPhase, PodState


def _rank(pod: PodState) -> tuple[int, datetime, str]:
    if pod.state is PodPhase.UNSCHEDULABLE:
        group = 0
    elif pod.state is PodPhase.STARTING and pod.phase == "Pending":
        group = 1
    elif pod.state is PodPhase.STARTING:
        group = 2
    else:
        group = 3
    return group, pod.created, pod.name


_REMOVABLE = (PodPhase.UNSCHEDULABLE, PodPhase.STARTING, PodPhase.IDLE)


def choose(pods: Iterable[PodState], count: int, protected: frozenset[str]) -> list[Drain | Delete]:
    """Pick up to `count` pods to remove; `protected` names are never picked (rotation surges)."""
    candidates = sorted(
        (p for p in pods if p.state in _REMOVABLE and p.name not in protected),
        key=_rank,
    )
    actions: list[Drain | Delete] = []
    for pod in candidates[: max(count, 0)]:
        if pod.phase == "Pending":
            actions.append(Delete(pod.name, f"scale-in: {pod.state.value} pod, never ran"))
        else:
            actions.append(Drain(pod.name, f"scale-in: {pod.state.value} pod"))
    return actions


def finish_drains(pods: Iterable[PodState], now: datetime, drain_timeout: timedelta) -> list[Delete]:
    """Phase 2: delete draining pods that are idle again or whose drain timed out."""
    deletes = []
    for pod in pods:
        if pod.state is not PodPhase.DRAINING or pod.draining_since is None:
            continue
        if pod.inflight == 0:
            deletes.append(Delete(pod.name, "drained: no work in flight"))
        elif now - pod.draining_since >= drain_timeout:
            deletes.append(Delete(pod.name, f"drain timeout {drain_timeout} with work in flight"))
    return deletes


def reap(pods: Sequence[PodState]) -> list[Delete]:
    """Delete pods that exited (the agent ends after a drain; a crash ends as Failed)."""
    return [Delete(p.name, f"pod {p.phase}") for p in pods if p.state is PodPhase.FINISHED and not p.deleting]
