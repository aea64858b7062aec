"""The reconcile core: one pure function from what was observed to what to do.

`plan(...)` validates the spec, reads the metrics, and combines the policies in this
order: expectations -> budget -> scaling -> memory -> pod manifest -> reap and finish
drains -> scale-in -> rotation -> status and events. The shell applies a Plan as:
creates, drains, deletes, one status patch, events; then stores `plan.expect(names)` as
the state for the next cycle. With an invalid spec the plan touches no pod: it only
reports SpecValid=False.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import ValidationError

from tars_contract import contract
from tars_operator import builders
from tars_operator.models import AgentPoolSpec, AgentPoolStatus, Condition
from tars_operator.policy import budget, memory, rotation, scale_in, scaling
from tars_operator.policy.actions import Delete, Drain, Resize
from tars_operator.policy.conditions import Verdict, is_true, merge, patch
from tars_operator.policy.expectations import Expectation, outstanding
from tars_operator.policy.metrics import Metrics, Sample, read
from tars_operator.policy.observe import Counts, PodState, count, surge_pods
from tars_operator.units import format_mebibytes
from tars_operator.validation import Checked

# How often status.queueDepthSampleTime is renewed while the count holds (queue_sample_time).
SAMPLE_TIME_RENEWAL = timedelta(minutes=5)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Conditions whose change of status deserves an Event, with their unhealthy status.
_ALARMS = {"Ready": "False", "MetricsAvailable": "False", "SpecValid": "False", "BudgetSaturated": "True"}


@dataclass(frozen=True)
class Create:
    manifest: dict[str, Any]
    reason: str
    replaces: str | None = None


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class ControllerState:
    """What the controller remembers between cycles (in memory; losing it only delays scale-in)."""

    history: scaling.ScaleHistory = field(default_factory=scaling.ScaleHistory)
    expectations: tuple[Expectation, ...] = ()


@dataclass(frozen=True)
class Plan:
    creates: tuple[Create, ...]
    drains: tuple[Drain, ...]
    deletes: tuple[Delete, ...]
    status: dict[str, Any]
    events: tuple[Event, ...]
    state: ControllerState
    now: datetime
    resizes: tuple[Resize, ...] = ()

    def expect(self, created: Sequence[str]) -> ControllerState:
        """The state for the next cycle once the shell applied this plan; `created`: names the API gave."""
        new = [Expectation(n, "create", self.now) for n in created]
        new += [Expectation(d.pod, "drain", self.now) for d in self.drains]
        new += [Expectation(d.pod, "delete", self.now) for d in self.deletes]
        new += [Expectation(r.pod, "resize", self.now, r.memory_limit) for r in self.resizes]
        return ControllerState(self.state.history, self.state.expectations + tuple(new))


def _previous(status: Mapping[str, Any]) -> AgentPoolStatus:
    # A status someone else mangled must not stop the pool: start afresh.
    try:
        return AgentPoolStatus.model_validate(status)
    except ValidationError:
        return AgentPoolStatus()


def _events(before: Sequence[Condition], after: Sequence[Condition]) -> list[Event]:
    old = {c.type: c.status for c in before}
    events = []
    for cond in after:
        # A first appearance is news only when it is bad.
        alarm = _ALARMS.get(cond.type)
        if (
            alarm is None
            or old.get(cond.type, "Unknown" if cond.status == alarm else cond.status) == cond.status
        ):
            continue
        kind: Literal["Normal", "Warning"] = "Warning" if cond.status == alarm else "Normal"
        events.append(Event(kind, cond.reason, f"{cond.type}={cond.status}: {cond.message}"))
    return events


def _counted_status(pool: builders.PoolRef, counts: Counts) -> dict[str, Any]:
    return {
        "observed_generation": pool.generation,
        "selector": f"{contract.POOL_LABEL}={pool.name}",
        "replicas": counts.active,
        "ready": counts.ready,
        "warm": counts.warm,
        "busy": counts.busy,
        "draining": counts.draining,
        "unschedulable": counts.unschedulable,
    }


def _resizes(
    pods: Sequence[PodState], manifest: dict[str, Any], limit: int | None, resizing: frozenset[str]
) -> list[Resize]:
    """Running agents whose memory limit differs from the pool's: resized in place, not rotated.
    `resizing`: pods whose earlier resize the watch does not show yet (one patch, one Event)."""
    if limit is None:
        return []
    agent = manifest["spec"]["containers"][0]
    return [
        Resize(p.name, agent["name"], agent["resources"], f"memory limit {p.memory_limit} -> {limit}", limit)
        for p in pods
        if p.active and p.phase == "Running" and p.memory_limit != limit and p.name not in resizing
    ]


def _recent_creates(pods: Sequence[PodState], now: datetime, interval: timedelta) -> int:
    # A creation time beyond one interval in the future is a clock error: not counted, so it cannot block.
    return sum(1 for p in pods if now - interval < p.created <= now + interval)


def plan(
    pool: builders.PoolRef,
    checked: Checked,
    status: Mapping[str, Any],
    pods: Sequence[PodState],
    metrics: Metrics,
    now: datetime,
    state: ControllerState,
    defaults: builders.OperatorDefaults,
) -> Plan:
    """Everything to do for one pool this cycle. `checked`: the spec as `validation.check` parsed it
    (once per generation); `status`: the last status written."""
    prev = _previous(status)
    counts = count(pods)
    pending = outstanding(state.expectations, pods, now)
    parsed, problems = checked
    if parsed is None or problems:
        message = "; ".join(str(p) for p in problems)[:32768]
        conditions = merge(
            prev.conditions, [Verdict("SpecValid", "False", "Invalid", message)], now, pool.generation
        )
        new_status = prev.model_copy(update={**_counted_status(pool, counts), "conditions": conditions})
        return Plan(
            (),
            (),
            (),
            patch(new_status),
            tuple(_events(prev.conditions, conditions)),
            ControllerState(state.history, pending),
            now,
        )
    return _plan_valid(
        pool, parsed, prev, pods, counts, metrics, now, ControllerState(state.history, pending), defaults
    )


def _plan_valid(
    pool: builders.PoolRef,
    spec: AgentPoolSpec,
    prev: AgentPoolStatus,
    pods: Sequence[PodState],
    counts: Counts,
    metrics: Metrics,
    now: datetime,
    state: ControllerState,
    defaults: builders.OperatorDefaults,
) -> Plan:
    interval = spec.scaling.interval.delta
    queue = read(metrics.queue_depth, now, interval, metrics.queue_depth_error)
    verdict = budget.assess(
        spec.rate_limit is not None,
        read(metrics.budget_utilization, now, interval).value,
        read(metrics.limiter_wait_seconds, now, interval).value,
        is_true(prev.conditions, "BudgetSaturated"),
    )
    pending = sum(1 for e in state.expectations if e.holds_scaling)
    decision = scaling.decide(
        spec,
        counts,
        queue.value,
        verdict.saturated,
        state.history,
        _recent_creates(pods, now, interval),
        pending,
        now,
    )
    mem = memory.decide(
        spec.memory,
        builders.template_memory_limit(spec),
        prev.memory_limit.bytes if prev.memory_limit else None,
        metrics.memory,
        pods,
        now,
        prev.memory_oom_handled,
    )
    manifest = builders.render(pool, spec, mem.limit if spec.memory.mode == "Auto" else None, defaults)
    template_hash = manifest["metadata"]["labels"][contract.TEMPLATE_HASH_LABEL]

    busy_names = {e.pod for e in state.expectations if e.holds_scaling}
    deletes = [
        d
        for d in scale_in.reap(pods) + scale_in.finish_drains(pods, now, spec.rotation.drain_timeout.delta)
        if d.pod not in busy_names
    ]
    removals = scale_in.choose(pods, decision.remove, surge_pods(pods))
    drains = [a for a in removals if isinstance(a, Drain)]
    deletes += [a for a in removals if isinstance(a, Delete)]
    rot = rotation.decide(
        pods,
        now,
        spec.rotation.ttl.delta,
        spec.rotation.jitter.delta,
        spec.rotation.max_unavailable,
        template_hash,
        frozenset(a.pod for a in removals),
    )
    creates = [Create(manifest, f"scale-up: {decision.reason}") for _ in range(decision.create)]
    if not pending:
        drains += rot.drains
        if not counts.unschedulable:
            creates += [
                Create(builders.with_replaces(manifest, r.pod), r.reason, r.pod) for r in rot.replacements
            ]

    resizing = frozenset(e.pod for e in state.expectations if e.kind == "resize")
    resizes = _resizes(pods, manifest, mem.limit, resizing) if spec.memory.mode == "Auto" else []

    scaled = bool(decision.create or removals)
    conditions = merge(
        prev.conditions,
        [
            Verdict(
                "Ready",
                "True" if counts.ready >= decision.desired else "False",
                "AgentsReady"
                if counts.ready >= decision.desired
                else ("Unschedulable" if counts.unschedulable else "AgentsStarting"),
                f"{counts.ready} of {decision.desired} agents ready",
            ),
            Verdict(
                "Scaling",
                "True" if scaled or counts.capacity != decision.desired else "False",
                decision.reason,
                f"{decision.message}; rotation: {rot.message}",
            ),
            Verdict(
                "MetricsAvailable",
                "True" if queue.value is not None else "False",
                queue.reason,
                f"queue depth: {queue.message}",
            ),
            Verdict("SpecValid", "True", "Valid", "spec passed validation"),
            Verdict(
                "BudgetSaturated", "True" if verdict.saturated else "False", verdict.reason, verdict.message
            ),
        ],
        now,
        pool.generation,
    )
    new_status = AgentPoolStatus.model_validate(
        {
            **_counted_status(pool, counts),
            "queue_depth": round(queue.value) if queue.value is not None else prev.queue_depth,
            "queue_depth_sample_time": queue_sample_time(
                queue.value, metrics.queue_depth, prev, interval, renewal_phase(pool.uid, interval)
            ),
            "desired_replicas": decision.desired,
            "last_decision_reason": f"{decision.reason}: {decision.message}"[:1024],
            "memory_limit": format_mebibytes(mem.limit) if mem.limit else None,
            "memory_recommendation": format_mebibytes(mem.recommendation) if mem.recommendation else None,
            "memory_oom_handled": mem.oom_at
            if spec.memory.mode == "Auto" and mem.oom_at
            else prev.memory_oom_handled,
            "last_scale_time": now.replace(microsecond=0) if scaled else prev.last_scale_time,
            "conditions": conditions,
        }
    )
    events = _events(prev.conditions, conditions)
    if decision.create:
        events.append(Event("Normal", "ScaledUp", f"creating {decision.create}: {decision.message}"))
    if removals:
        events.append(Event("Normal", "ScaledDown", f"removing {len(removals)}: {decision.message}"))
    for create in creates:
        if create.replaces is not None:
            events.append(Event("Normal", "Rotating", f"replacing {create.replaces}: {create.reason}"))
    for drain in drains:
        events.append(Event("Normal", "Draining", f"draining {drain.pod}: {drain.reason}"))
    for resize in resizes:
        events.append(Event("Normal", "Resizing", f"resizing {resize.pod} in place: {resize.reason}"))
    if mem.changed and spec.memory.mode == "Auto":
        kind: Literal["Normal", "Warning"] = "Warning" if mem.oom_pod else "Normal"
        events.append(Event(kind, f"MemoryLimit{mem.reason}", mem.message))
    return Plan(
        tuple(creates),
        tuple(drains),
        tuple(deletes),
        patch(new_status),
        tuple(events),
        ControllerState(decision.history, state.expectations),
        now,
        tuple(resizes),
    )


def queue_sample_time(
    value: float | None, sample: Sample | None, prev: AgentPoolStatus, interval: timedelta, phase: timedelta
) -> datetime | None:
    """The queue depth's sample time in status: when the count in status was sampled, renewed
    while it holds once every SAMPLE_TIME_RENEWAL (or interval, if longer), as a kubelet reports an
    unchanged node status every 5 minutes. A time new on every cycle made every cycle's status
    differ, so every pool wrote it once an interval: ~10 writes a second at 100 pools, each
    echoed back to the operator as a watch event.

    The renewal falls when the sample time crosses the pool's next boundary, `phase` (in
    [0, renewal), fixed by the pool's UID) past each multiple of the renewal since the epoch:
    counted from the last write instead, pools whose count an operator start wrote in the same
    seconds renewed it in the same seconds ever after (100 status writes at once at 100 pools)."""
    if value is None or sample is None:
        return prev.queue_depth_sample_time
    since = prev.queue_depth_sample_time
    renewal = max(SAMPLE_TIME_RENEWAL, interval)
    if since is None or prev.queue_depth != round(value):
        return sample.at
    if (sample.at - _EPOCH - phase) // renewal <= (since - _EPOCH - phase) // renewal:
        return since
    return sample.at


def renewal_phase(uid: str, interval: timedelta) -> timedelta:
    """A pool's phase for queue_sample_time, fixed by its UID."""
    return rotation.jitter(uid, max(SAMPLE_TIME_RENEWAL, interval))
