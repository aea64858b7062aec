"""Memory right-sizing of the agent container (VPA-like, applied to new pods).

Rule, from the agents' working-set samples within `memory.window` (at least 12 of them):
  usage  = max(p95 / targetUtilization, peak x 1.1)
where p95 is the highest of the agents' own 95th percentiles (Prometheus' quantile_over_time,
see queries.agent_memory_usage) and peak the highest sample: the hungriest agent's p95 sits at
`targetUtilization` of the limit, and the limit never falls below the highest observed usage
plus 10 %. After an OOMKilled at (or above) the limit in force, the recommendation is at least
1.5 x that limit -- even without enough samples; each kill is answered once
(status.memoryOomHandled), since a pod resized in place keeps its record of the kill at its
new limit, and within `window` after a kill the limit is not lowered (the samples since the
kill do not show what caused it).
The result is bounded by [memory.min, memory.max] and rounded up to a whole Mi.
Modes: Off -- nothing computed, the template's limit stands; Recommend -- reported in
status.memoryRecommendation only; Auto -- becomes the limit of new pods (the pod
template hash covers it, so rotation rolls the pool, maxUnavailable at a time).
Hysteresis: Auto changes the limit only when the recommendation is > 10 % above or
> 20 % below the limit in force (an OOM bump always applies), so the pool does not roll
for noise. Auto starts from the template's limit, or memory.max when it has none (safe
until data arrives).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from tars_operator.models import Memory
from tars_operator.policy.metrics import MemoryUsage
from tars_operator.policy.observe import PodState
from tars_operator.units import ceil_mebibytes

MIN_SAMPLES = 12
PEAK_MARGIN = 1.1
OOM_FACTOR = 1.5
RAISE_ABOVE = 1.10
LOWER_BELOW = 0.80


@dataclass(frozen=True)
class MemoryDecision:
    """The limit for new pods and the numbers behind it (for status and an Event)."""

    limit: int | None  # bytes; None = no limit set by the operator (the template's stands)
    recommendation: int | None
    changed: bool  # Auto changed the limit in force: worth an Event
    reason: str
    message: str
    p95: float | None = None
    peak: float | None = None
    samples: int = 0
    oom_pod: str | None = None
    oom_at: datetime | None = None  # when the OOM kill this decision answers happened


def decide(
    memory: Memory,
    template_limit: int | None,
    applied: int | None,
    usage: MemoryUsage | None,
    pods: Sequence[PodState],
    now: datetime,
    oom_handled: datetime | None = None,
) -> MemoryDecision:
    """`applied`: the limit Auto set before (status.memoryLimit); `template_limit`: the template's;
    `oom_handled`: the OOM kill an earlier bump answered (status.memoryOomHandled)."""
    if memory.mode == "Off":
        return MemoryDecision(template_limit, None, False, "Off", "memory.mode is Off")
    lo, hi = memory.min.bytes, memory.max.bytes
    in_force = applied or template_limit or hi
    if memory.mode == "Auto":
        in_force = min(max(in_force, lo), hi)
    window = memory.window.delta
    count = usage.samples if usage is not None else 0
    p95 = peak = None
    candidates: list[float] = []
    if usage is not None and count >= MIN_SAMPLES:
        p95, peak = usage.p95, usage.peak
        candidates.append(max(p95 / memory.target_utilization, peak * PEAK_MARGIN))
    oomed = [
        p
        for p in pods
        if p.last_oom is not None
        and now - window <= p.last_oom
        and (oom_handled is None or p.last_oom > oom_handled)
        and p.memory_limit is not None
        and p.memory_limit >= in_force
    ]
    oom_pod = max(oomed, key=lambda p: (p.memory_limit or 0, p.name)) if oomed else None
    if oom_pod is not None and oom_pod.memory_limit is not None:
        candidates.append(oom_pod.memory_limit * OOM_FACTOR)
    numbers = (
        f"samples={count} p95={_mi(p95)} peak={_mi(peak)} target={memory.target_utilization}"
        f" inForce={_mi(in_force)}" + (f" oomKilled={oom_pod.name}" if oom_pod else "")
    )
    if not candidates:
        limit = in_force if memory.mode == "Auto" else template_limit
        return MemoryDecision(
            limit,
            None,
            False,
            "NotEnoughData",
            f"need {MIN_SAMPLES} samples in {window}; {numbers}",
            samples=count,
        )
    rec = min(max(ceil_mebibytes(max(candidates)), lo), hi)
    base = MemoryDecision(
        template_limit,
        rec,
        False,
        "Recommend",
        f"recommend {_mi(rec)}: {numbers}",
        p95,
        peak,
        count,
        oom_pod.name if oom_pod else None,
    )
    if memory.mode == "Recommend":
        return base
    if oom_pod is not None:
        reason = "OOMKilled" if rec > in_force else "OOMKilledAtMax"
        limit = max(rec, in_force)
    elif rec > in_force * RAISE_ABOVE:
        reason, limit = "Resized", rec
    elif rec < in_force * LOWER_BELOW and oom_handled is not None and now - window <= oom_handled:
        # The samples since a kill do not show what killed it: no lowering within the window.
        reason, limit = "HoldAfterOOMKill", in_force
    elif rec < in_force * LOWER_BELOW:
        reason, limit = "Resized", rec
    else:
        reason, limit = "WithinHysteresis", in_force
    return MemoryDecision(
        limit,
        rec,
        limit != applied,
        reason,
        f"limit {_mi(limit)} (was {_mi(applied)}), recommend {_mi(rec)}: {numbers}",
        p95,
        peak,
        count,
        base.oom_pod,
        oom_pod.last_oom if oom_pod else None,
    )


def _mi(n_bytes: float | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:.0f}Mi"
