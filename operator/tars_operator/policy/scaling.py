"""Scaling: how many agents the pool should have, and how many to add or remove now.

Rule:
  recommendation = clamp(max(busy, ceil(load) + warm.min) + extra, replicas.min, replicas.max)
  extra          = ceil((queueDepth - threshold) / targetPerAgent) when queueDepth > threshold, else 0
i.e. every busy agent is kept, `warm.min` agents' worth of free slots wait on top of the work
(even when all agents are full), and the backlog beyond `threshold` gets one more agent per
`targetPerAgent` queued tasks. `load` is the work in whole agents' worth of slots
(observe.py): with one task per agent it is the busy count, and the rule is busy + warm.min;
agents that run several tasks at once are warm room while they have free slots, so a pool whose
every agent holds a task or two does not grow to replicas.max for its warm floor.

* Scale-up is immediate; scale-down follows the highest recommendation within
  `scaleDown.stabilizationWindow` (like the HPA), and only once the recorded history
  covers the whole window (after an operator restart or a backwards clock jump nothing
  scales in for one window).
* Queue depth missing, stale or from the future: `Hold` keeps the current size (never
  less than the floor, never scales in); `UseMin` recommends the floor
  (max(replicas.min, the warm floor above)), which still passes the stabilization window and
  scale-in of known-idle pods only -- the pool drifts to the floor, it is never cut blindly.
* A ready pod that does not report its in-flight count blocks scale-in this cycle.
* Budget saturated (budget.py): no growth beyond the current size.
* At most `maxSpawnPerInterval` creates per `interval` (pods created within the last
  interval count), none while earlier actions are unobserved (expectations.py) and none
  while a pod is unschedulable: such pods are reported, not replaced again and again.
* `replicas.max` below the current size (a spec change) shrinks at once.
"""

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from tars_operator.models import AgentPoolSpec
from tars_operator.policy.observe import Counts


@dataclass(frozen=True)
class Recommendation:
    at: datetime
    replicas: int


@dataclass(frozen=True)
class ScaleHistory:
    """Recent recommendations; the shell keeps it between cycles and hands it back."""

    entries: tuple[Recommendation, ...] = field(default=())


@dataclass(frozen=True)
class ScaleDecision:
    desired: int
    recommendation: int
    create: int
    remove: int
    reason: str  # CamelCase, for status.lastDecisionReason and the Scaling condition
    message: str
    history: ScaleHistory


def _remember(history: ScaleHistory, rec: Recommendation, window: timedelta) -> tuple[ScaleHistory, bool]:
    """Add `rec`, drop entries out of the window; return the history and whether it covers the window."""
    now = rec.at
    if any(e.at > now for e in history.entries):
        # The clock went back: the entries' ages are meaningless, start over (delays scale-in only).
        return ScaleHistory((rec,)), False
    cutoff = now - window
    inside = [e for e in history.entries if e.at > cutoff]
    before = [e for e in history.entries if e.at <= cutoff]
    # Keep the last entry at/before the cutoff: it was in force at the window's start.
    kept = before[-1:] + inside + [rec]
    return ScaleHistory(tuple(kept)), bool(before)


def _floor_message(counts: Counts, work: int, warm: int) -> str:
    if work == counts.busy:
        return f"busy {counts.busy} + warm {warm}"
    worth = f"busy {counts.busy} with {counts.load:.2f} agents' worth of work"
    if counts.busy > work + warm:
        return f"{worth}, all kept (warm {warm} fits in their free slots)"
    return f"{worth} + warm {warm}"


def _create_blocker(counts: Counts, actions_pending: int) -> tuple[str, str] | None:
    if actions_pending:
        return "WaitingForPods", f"{actions_pending} earlier pod actions not yet observed"
    if counts.unschedulable:
        return "Unschedulable", f"{counts.unschedulable} pods cannot be scheduled; not adding more"
    return None


def decide(
    spec: AgentPoolSpec,
    counts: Counts,
    queue_depth: float | None,
    budget_saturated: bool,
    history: ScaleHistory,
    recent_creates: int,
    actions_pending: int,
    now: datetime,
) -> ScaleDecision:
    """Decide the target size and this cycle's creates/removals.

    `recent_creates`: pods created within the last interval; `actions_pending`: outstanding
    expectations. Returns the reason of the binding constraint with the numbers behind it.
    """
    floor, ceiling = spec.replicas.min, spec.replicas.max
    work = math.ceil(counts.load - 1e-9)  # whole agents' worth (3 x 1/3 is 1, not 2)
    base = max(counts.busy, work + spec.warm.min)
    capacity = counts.capacity
    metrics_ok = queue_depth is not None
    if queue_depth is not None:
        backlog = max(0.0, queue_depth - spec.scaling.queue_depth.threshold)
        extra = math.ceil(backlog / spec.scaling.queue_depth.target_per_agent)
        raw = base + extra
        why, msg = "WarmFloor", _floor_message(counts, work, spec.warm.min)
        if extra:
            threshold = spec.scaling.queue_depth.threshold
            why, msg = "QueueAboveThreshold", f"{msg} + {extra} for queue {queue_depth:.0f} > {threshold}"
    elif spec.scaling.on_metrics_unavailable == "Hold":
        raw = max(capacity, base)
        why, msg = "MetricsUnavailableHold", "queue depth unavailable: holding the current size"
    else:
        raw = base
        why, msg = "MetricsUnavailableUseMin", "queue depth unavailable: moving to the floor"
    rec = min(max(raw, floor), ceiling)
    if raw > ceiling:
        why, msg = "AtMax", f"{msg}; capped at replicas.max {ceiling}"
    elif raw < floor:
        why, msg = "AtMin", f"{msg}; raised to replicas.min {floor}"
    if budget_saturated and rec > max(capacity, floor):
        rec = max(capacity, floor)
        why, msg = "BudgetSaturated", f"{msg}; held at {rec}: the LLM budget is saturated"

    window = spec.scaling.scale_down.stabilization_window.delta
    history, covered = _remember(history, Recommendation(now, rec), window)
    if capacity > ceiling:
        desired = ceiling  # the spec's bound, not a metric: obey at once
    elif rec >= capacity:
        desired = rec
    elif not metrics_ok and spec.scaling.on_metrics_unavailable == "Hold":
        desired = capacity
    elif not covered:
        desired = capacity
        why, msg = "ScaleDownStabilizing", f"{msg}; waiting for a full stabilization window of history"
    else:
        desired = min(capacity, max(e.replicas for e in history.entries))
        if desired > rec:
            why, msg = "ScaleDownStabilizing", f"{msg}; highest recommendation in the window is {desired}"

    create = max(0, desired - capacity)
    remove = max(0, capacity - desired)
    if create:
        room = max(0, spec.scaling.max_spawn_per_interval - recent_creates)
        blocker = _create_blocker(counts, actions_pending)
        if blocker:
            create = 0
            why, msg = blocker[0], f"{msg}; {blocker[1]}"
        elif room < create:
            create = room
            why = "SpawnRateLimited"
            limit = spec.scaling.max_spawn_per_interval
            msg = f"{msg}; {recent_creates} created in the last interval, at most {limit}"
    if remove:
        if actions_pending:
            remove = 0
            why, msg = "WaitingForPods", f"{msg}; {actions_pending} earlier pod actions not yet observed"
        elif counts.unknown and capacity <= ceiling:
            remove = 0
            why, msg = "AgentStatusUnknown", f"{msg}; {counts.unknown} ready pods do not report work"
    return ScaleDecision(
        desired=desired,
        recommendation=rec,
        create=create,
        remove=remove,
        reason=why,
        message=f"desired {desired} (have {capacity}): {msg}",
        history=history,
    )
