"""Rotation: replace agents after their TTL, or when the pod template changed.

Rule: a pod is due when its template hash differs from the current one, or when it is
older than `ttl + jitter(pod)`, where jitter(pod) is a fixed fraction of
`rotation.jitter` derived from the pod's uid (sha256), so pods created together do not
all expire together, and a cycle re-run gives the same answer. Rotation is surge-first:
  1. create a replacement pod annotated `tars.dev/replaces: <old pod>`;
  2. once the replacement is Ready, drain the old pod (scale_in.finish_drains deletes it
     when idle, or after drainTimeout if it is still busy);
  3. at most `maxUnavailable` rotations are in progress at once (a replacement not yet
     Ready, or an old pod still draining next to its replacement).
An unschedulable replacement stalls that rotation: the old pod keeps serving. The oldest
due pods go first. The surge can exceed replicas.max by at most maxUnavailable.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from tars_operator.policy.actions import Drain
from tars_operator.policy.observe import PodPhase, PodState

_READY = (PodPhase.BUSY, PodPhase.IDLE, PodPhase.UNKNOWN)


@dataclass(frozen=True)
class Replace:
    """Create a surge pod replacing `pod`."""

    pod: str
    reason: str


@dataclass(frozen=True)
class RotationDecision:
    replacements: tuple[Replace, ...]
    drains: tuple[Drain, ...]
    due: int
    in_progress: int
    message: str


def jitter(uid: str, spread: timedelta) -> timedelta:
    """A per-pod offset in [0, spread), fixed by the pod's uid."""
    fraction = int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "big") / 2**64
    return spread * fraction


def due_reason(
    pod: PodState, now: datetime, ttl: timedelta, spread: timedelta, template_hash: str
) -> str | None:
    if pod.template_hash != template_hash:
        return "rotation: pod template changed"
    if now - pod.created >= ttl + jitter(pod.uid, spread):
        return f"rotation: older than ttl {ttl}"
    return None


def decide(
    pods: Sequence[PodState],
    now: datetime,
    ttl: timedelta,
    spread: timedelta,
    max_unavailable: int,
    template_hash: str,
    excluded: frozenset[str],
) -> RotationDecision:
    """Plan this cycle's rotation steps; `excluded` pods (being scaled in) are left alone."""
    replacement_of = {p.replaces: p for p in pods if p.replaces and p.active}
    live = {p.name for p in pods if p.active}
    surges = {p.name for p in pods if p.active and p.replaces in live}
    # Old pods still draining beside their replacement keep a rotation slot busy.
    in_progress = sum(1 for p in pods if p.state is PodPhase.DRAINING and p.name in replacement_of)
    fresh: list[Replace] = []
    drains: list[Drain] = []
    due = 0
    for pod in sorted(pods, key=lambda p: (p.created, p.name)):
        if not pod.active or pod.name in excluded or pod.name in surges:
            continue
        reason = due_reason(pod, now, ttl, spread, template_hash)
        if reason is None:
            continue
        due += 1
        replacement = replacement_of.get(pod.name)
        if replacement is None:
            fresh.append(Replace(pod.name, reason))
        elif replacement.state in _READY:
            drains.append(Drain(pod.name, f"{reason}; replacement {replacement.name} is ready"))
            in_progress += 1
        else:
            in_progress += 1
    started = fresh[: max(0, max_unavailable - in_progress)]
    waiting = len(fresh) - len(started)
    message = f"{due} due, {in_progress + len(started)} in progress (max {max_unavailable})"
    if waiting:
        message += f", {waiting} waiting for a slot"
    return RotationDecision(tuple(started), tuple(drains), due, in_progress + len(started), message)
