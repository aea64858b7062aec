"""The thin shell around `policy.plan`: observe one pool, plan, apply the plan.

One cycle: read the pool's pods (from the kopf index), ask each ready agent
for its in-flight count, read Prometheus (every `scaling.interval`) and, for a
pool with the default query on the default Redis, the queue depth from Redis
(every second: a crossing of the threshold starts a cycle at once), call the
pure `plan(...)`, then apply it: creates, drains, deletes, one status patch,
events. Everything the cycle learns about failures goes into status and
Events; nothing here decides anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

from tars_contract import contract
from tars_operator import builders, models, observability, queries
from tars_operator.kubeclient import API_ERRORS, ApiError, KubeApi
from tars_operator.leader import Fence
from tars_operator.policy.metrics import MemoryUsage, Metrics, Sample
from tars_operator.policy.observe import PodState, pod_state
from tars_operator.policy.plan import ControllerState, Plan, plan
from tars_operator.sources import (
    AgentClient,
    AgentState,
    AgentStateReader,
    PoolReading,
    PrometheusReader,
    QueryResult,
)
from tars_operator.validation import Checked, check

log = logging.getLogger("tars_operator")

# A write gives up after this long (or when the leader's fence lapses, if sooner): an API server
# that does not answer must not hold a cycle, nor let a write land after leadership ended.
WRITE_TIMEOUT_S = 5.0
# How long a cycle waits for Prometheus once it has answered before (refresh_metrics). Locally
# it answers in milliseconds; its client's timeout is 5 s.
METRICS_WAIT_S = 0.5
# The agents' memory is summed up 60 times a window (or once an interval, if that is longer):
# once a minute for the default hour. Between reads at most 1/60 of the samples change, sizing
# has hysteresis, and an OOM kill is seen in the pod's status at once; each read makes
# Prometheus evaluate the window three times over (at 100 pools every 10 s, most of its CPU).
MEMORY_READS_PER_WINDOW = 60
Outcome = Literal["done", "gone", "failed"]
EventSink = Callable[[str, str, str], Awaitable[None]]  # (type, reason, message)


@dataclass(frozen=True)
class AgentPod:
    """What the pod index keeps per agent pod: small, no managedFields."""

    name: str
    uid: str
    ip: str | None
    owner_uid: str | None
    state: PodState


def index_entry(pod: Mapping[str, Any]) -> AgentPod:
    owners = [o for o in pod["metadata"].get("ownerReferences") or [] if o.get("controller")]
    return AgentPod(
        name=pod["metadata"]["name"],
        uid=pod["metadata"]["uid"],
        ip=(pod.get("status") or {}).get("podIP"),
        owner_uid=owners[0]["uid"] if owners else None,
        state=pod_state(pod, None),
    )


class Observation(NamedTuple):
    """A pool's pods as observed (see PoolController.observe), by name, and its queue depth in Redis."""

    pods: list[PodState]
    by_name: dict[str, AgentPod]
    queue_depth: Sample | None


def _nothing() -> None:
    pass


def reason_label(reason: str) -> str:
    """A bounded metric label from a free-text reason ("scale-up: QueueAboveThreshold" -> "scale-up")."""
    return reason.split(":", 1)[0].split(" ", 1)[0][:40]


@dataclass
class PoolController:
    name: str
    namespace: str
    uid: str
    kube: KubeApi
    prometheus: PrometheusReader
    agents: AgentClient
    defaults: builders.OperatorDefaults
    emit: EventSink
    state: ControllerState = field(default_factory=ControllerState)
    scraped: Metrics = field(default_factory=Metrics)  # as Prometheus answered at the last read
    metrics_read_at: float = float("-inf")  # when the last read of Prometheus answered
    metrics_read: asyncio.Task[None] | None = None  # a read under way (refresh_metrics)
    metrics_late: bool = False  # a cycle stopped waiting for the read under way
    # Called when a read a cycle stopped waiting for has answered: the pool's loop wakes for it.
    metrics_arrived: Callable[[], None] = _nothing
    # The agents' memory as Prometheus last summed it up, and when (MEMORY_READS_PER_WINDOW).
    memory: MemoryUsage | None = None
    memory_read_at: float = float("-inf")
    last_busy: frozenset[str] = frozenset()
    # The status as our last write left it (the patch response): the watch's copy can lag it,
    # and a cycle planned from a stale status repeats what the last one did (a second OOM bump).
    written_status: Mapping[str, Any] | None = None
    checked_spec: tuple[int, Checked] | None = None  # (generation, its parsed spec)
    # The leader's authority (leader.py): every write is checked against it and cut off with it.
    fence: Fence = field(default_factory=Fence.unlimited)
    # The agents' state as they publish it in Redis (one round trip for the pool); None: every
    # agent is asked over HTTP (GET /status), as for a pool with a Redis of its own.
    agent_states: AgentStateReader | None = None
    # The queue depth read from Redis that the last cycle planned with (None: none was read).
    cycle_queue_depth: float | None = None

    async def observe(
        self, indexed: Sequence[AgentPod], spec: models.AgentPoolSpec | None = None
    ) -> Observation:
        """The pool's own pods (controller owner = this pool), with the agents' in-flight counts,
        and for `spec` its queue depth in Redis where that is what its query measures.

        Ready agents and draining ones count: a draining agent reports NotReady, and its
        in-flight count is what lets the drain end as soon as its work is done. Their published
        state is read first; only agents without a usable one are asked GET /status. When that
        read fails, every count is unknown this cycle (which blocks scale-in, never reads as idle).
        The queue depth: the default query (every agent's tars_queue_depth) on the default Redis,
        read in the same round trip; None otherwise, or when Redis did not answer (Prometheus'
        value stands)."""
        mine = [p for p in indexed if p.owner_uid == self.uid]
        working = [p for p in mine if _reports_work(p.state)]
        with_depth = spec is not None and spec.scaling.queue_depth.query is None
        reading = (
            await self.agent_states.read(self.namespace, self.name, [p.name for p in working], with_depth)
            if self.agent_states is not None
            else PoolReading({})
        )
        published = reading.states
        reports: dict[str, AgentState | None] = {}
        asked: list[AgentPod] = []  # no usable published state: GET /status
        for pod in working:
            state = published.get(pod.name) if published is not None else None
            if published is None:
                reports[pod.name] = None  # unreadable this cycle: unknown, read again next second
            elif state is not None and published_count_holds(pod.state, state):
                reports[pod.name] = state
            else:
                asked.append(pod)
        # Only the agents asked over HTTP get a task each: at 100 pools a task per agent and second
        # (2,000/s) was CPU the pool loops share with everything else.
        if asked:
            answers = await asyncio.gather(*(self.agents.state(p.ip) for p in asked))
            reports.update(zip((p.name for p in asked), answers, strict=True))
        states = [
            replace(p.state, inflight=r.inflight, slots=r.slots)
            if (r := reports.get(p.name))
            else replace(p.state, inflight=None)
            for p in mine
        ]
        return Observation(states, {p.name: p for p in mine}, reading.queue_depth)

    def busy_changed(self, pods: Sequence[PodState]) -> bool:
        """True when the set of busy agents changed since the last cycle (a reason to act now)."""
        busy = frozenset(p.name for p in pods if p.inflight)
        changed = busy != self.last_busy
        self.last_busy = busy
        return changed

    async def refresh_metrics(self, spec: models.AgentPoolSpec) -> None:
        """Read Prometheus into `scraped` when a read is due (every interval). Once one read has
        answered, a cycle waits for the next at most METRICS_WAIT_S: a slower answer lands in the
        background and calls metrics_arrived (the loop's wake), and this cycle plans with the one
        before, so a slow or hung Prometheus (up to its 5 s timeout) never holds up a decision
        on the queue Redis shows or on the pods."""
        interval = spec.scaling.interval.delta.total_seconds()
        if self.metrics_read is None and time.monotonic() - self.metrics_read_at >= interval:
            self.metrics_read = asyncio.create_task(
                self._read_metrics(spec), name=f"metrics {self.namespace}/{self.name}"
            )
        if self.metrics_read is None:
            return
        answered_before = self.metrics_read_at > float("-inf")
        done, _ = await asyncio.wait({self.metrics_read}, timeout=METRICS_WAIT_S if answered_before else None)
        self.metrics_late = not done

    async def _read_metrics(self, spec: models.AgentPoolSpec) -> None:
        try:
            self.scraped = await self.read_metrics(spec)
        except Exception:  # read_metrics returns failures as data: anything else is a bug to see
            log.exception("pool %s/%s: reading its metrics failed unexpectedly", self.namespace, self.name)
        finally:
            self.metrics_read_at = time.monotonic()
            self.metrics_read = None
            if self.metrics_late:
                self.metrics_late = False
                self.metrics_arrived()

    def stop(self) -> None:
        """Cancel a read of Prometheus still under way (the pool's loop has ended)."""
        if self.metrics_read is not None:
            self.metrics_read.cancel()

    async def read_metrics(self, spec: models.AgentPoolSpec) -> Metrics:
        """The pool's queries, all at once: one round trip to Prometheus, not one per query."""
        prom, limit = self.prometheus, spec.rate_limit
        queue = prom.query(queries.queue_depth(spec, self.name, self.namespace))
        budget = prom.query(queries.budget_utilization(limit.budget)) if limit else _no_result()
        wait = prom.query(queries.limiter_wait_seconds(self.name, self.namespace)) if limit else _no_result()
        interval = spec.scaling.interval.delta
        step = max(interval, dt.timedelta(seconds=2))
        memory_due = spec.memory.mode != "Off" and (
            time.monotonic() - self.memory_read_at
            >= max(spec.memory.window.delta / MEMORY_READS_PER_WINDOW, interval).total_seconds()
        )
        memory = (
            prom.query_by_label(
                queries.agent_memory_usage(self.name, self.namespace, spec.memory.window.delta, step),
                queries.MEMORY_STAT_LABEL,
            )
            if memory_due
            else _no_stats()
        )
        queue_result, budget_result, wait_result, memory_stats = await asyncio.gather(
            queue, budget, wait, memory
        )
        if queue_result.error is not None:
            # Prometheus (or the pool's query) failed: nothing else it said is trusted either.
            return Metrics(queue_depth_error=queue_result.error)
        if memory_due and (fresh := memory_usage(memory_stats)) is not None:
            self.memory, self.memory_read_at = fresh, time.monotonic()
        return Metrics(
            queue_depth=queue_result.sample,
            memory=self.memory if spec.memory.mode != "Off" else None,
            budget_utilization=budget_result.sample,
            limiter_wait_seconds=wait_result.sample,
        )

    def checked(self, body: Mapping[str, Any]) -> Checked:
        """The pool's spec, parsed and checked once per generation (the loop asks every second)."""
        generation = int(body["metadata"].get("generation", 1))
        if self.checked_spec is None or self.checked_spec[0] != generation:
            self.checked_spec = (generation, check(body.get("spec") or {}))
        return self.checked_spec[1]

    def queue_crossed(self, spec: models.AgentPoolSpec | None, depth: Sample | None) -> bool:
        """Whether the queue went above the threshold, or back to it, since the last cycle: the
        scale decision need not wait for the next interval (and Prometheus' next scrape)."""
        if spec is None or depth is None:
            return False
        threshold = spec.scaling.queue_depth.threshold
        was_above = self.cycle_queue_depth is not None and self.cycle_queue_depth > threshold
        return (depth.value > threshold) != was_above

    async def cycle(
        self,
        body: Mapping[str, Any],
        pods: Sequence[PodState],
        by_name: Mapping[str, AgentPod],
        observed_at: float | None = None,
        queue_depth: Sample | None = None,
    ) -> Plan:
        """One reconcile of `pods`; `observed_at` (time.monotonic()) is when their observation
        began, the start of the decision latency (default: now). `queue_depth`: the count in
        Redis (observe), see with_queue_count."""
        started = time.monotonic()
        observed_at = started if observed_at is None else observed_at
        checked = self.checked(body)
        parsed = checked[0]
        if parsed is not None:
            await self.refresh_metrics(parsed)
        self.cycle_queue_depth = queue_depth.value if queue_depth is not None else None
        pool = builders.PoolRef(
            self.name, self.namespace, self.uid, int(body["metadata"].get("generation", 1))
        )
        status = self.written_status if self.written_status is not None else body.get("status") or {}
        result = plan(
            pool,
            checked,
            status,
            pods,
            with_queue_count(self.scraped, queue_depth),
            dt.datetime.now(dt.UTC),
            self.state,
            self.defaults,
        )
        labels = {"namespace": self.namespace, "pool": self.name}
        observability.DECISION_SECONDS.labels(**labels).observe(time.monotonic() - observed_at)
        written = says(body.get("status") or {}, result.status)
        created = await self.apply(result, by_name, status_written=written)
        self.state = result.expect(created)
        observability.RECONCILE_SECONDS.labels(**labels).observe(time.monotonic() - started)
        desired = result.status.get("desiredReplicas")
        if desired is not None:
            observability.DESIRED_REPLICAS.labels(**labels).set(desired)
        reason = result.status.get("lastDecisionReason")
        if reason:
            observability.DECISIONS.labels(**labels, reason=reason_label(reason)).inc()
        return result

    async def _guard(
        self, stage: str, what: str, action: Awaitable[Any], gone_ok: bool = False
    ) -> tuple[Outcome, Any]:
        """Run one API action: ("done", its result), or ("failed", None) after the failure became
        a Warning Event and a metric: each step of a plan is accounted for on its own. Raises only
        _Fenced, when this replica's leadership lapsed (apply stops there).

        With `gone_ok`, a 404 is ("gone", None): the pod is already gone, which a delete or a
        drain can live with."""
        if not self.fence.holds():
            getattr(action, "close", lambda: None)()  # never sent: no "never awaited" warning
            log.warning(
                "pool %s/%s: %s skipped: this replica's leadership lapsed", self.namespace, self.name, what
            )
            raise _Fenced
        try:
            async with asyncio.timeout(min(WRITE_TIMEOUT_S, self.fence.remaining())):
                return "done", await action
        except Exception as exc:  # reported below; the rest of the plan goes on
            if gone_ok and isinstance(exc, ApiError) and exc.status == 404:
                log.info("pool %s/%s: %s: the pod is already gone", self.namespace, self.name, what)
                return "gone", None
            if not isinstance(exc, API_ERRORS):
                log.exception("pool %s/%s: %s failed unexpectedly", self.namespace, self.name, what)
            # An ApiError reads "422 Unprocessable Entity: <the server's message>".
            message = f"{what} failed: {str(exc) or type(exc).__name__}"[:1000]
            log.warning("pool %s/%s: %s", self.namespace, self.name, message)
            observability.ERRORS.labels(namespace=self.namespace, pool=self.name, stage=stage).inc()
            await self.event("Warning", f"{stage.capitalize()}Failed", message)
            return "failed", None

    async def event(self, kind: str, reason: str, message: str) -> None:
        """Post an Event about the pool, if this replica may still write (an Event is a write too)."""
        if self.fence.holds():
            await self.emit(kind, reason, message)

    async def apply(
        self, result: Plan, by_name: Mapping[str, AgentPod], status_written: bool = False
    ) -> list[str]:
        """Apply a plan step by step; returns the names of the pods the API created. A replica
        whose leadership lapsed stops at that step: what it created is still returned.
        `status_written`: the pool's copy already says what the plan's status says (no write)."""
        created: list[str] = []
        with contextlib.suppress(_Fenced):
            await self._apply(result, by_name, created, status_written)
        return created

    async def _apply(
        self, result: Plan, by_name: Mapping[str, AgentPod], created: list[str], status_written: bool
    ) -> None:
        labels = {"namespace": self.namespace, "pool": self.name}
        # The decision first, then its pods: a watcher never sees more agents than desiredReplicas
        # (creating a dozen pods takes seconds on a busy API server). The status is the plan's,
        # which no outcome below changes; a failed write is a Warning and the pods still go.
        if not status_written:
            outcome, written = await self._guard(
                "status",
                "writing the pool's status",
                self.kube.patch_namespaced_agent_pool_status(self.name, self.namespace, result.status),
            )
            if outcome == "done" and isinstance(written, Mapping):
                self.written_status = written.get("status") or {}
        for create in result.creates:
            outcome, new_pod = await self._guard(
                "create",
                "creating an agent pod",
                self.kube.create_namespaced_pod(self.namespace, create.manifest),
            )
            if outcome != "done":
                break  # the same error would repeat for the rest of this plan
            name = new_pod["metadata"]["name"]
            created.append(name)
            observability.PODS_CREATED.labels(**labels, reason=reason_label(create.reason)).inc()
            log.info("pool %s/%s: created %s (%s)", self.namespace, self.name, name, create.reason)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        for drain in result.drains:
            target = by_name.get(drain.pod)
            annotate = self.kube.patch_namespaced_pod(
                drain.pod, self.namespace, {"metadata": {"annotations": {contract.DRAINING_ANNOTATION: now}}}
            )
            outcome, _ = await self._guard("drain", f"marking {drain.pod} draining", annotate, gone_ok=True)
            if outcome == "done":
                error = await self.agents.drain(target.ip if target else None)
                if error:
                    # The drain timeout still bounds the wait; the pod may be reachable next cycle.
                    log.warning("pool %s/%s: %s", self.namespace, self.name, error)
                log.info("pool %s/%s: draining %s (%s)", self.namespace, self.name, drain.pod, drain.reason)
        for delete in result.deletes:
            victim = by_name.get(delete.pod)
            # The UID precondition: never delete a newer pod that reuses the name.
            remove = self.kube.delete_namespaced_pod(
                delete.pod, self.namespace, victim.uid if victim else None
            )
            outcome, _ = await self._guard("delete", f"deleting {delete.pod}", remove, gone_ok=True)
            if outcome == "done":
                observability.PODS_DELETED.labels(**labels, reason=reason_label(delete.reason)).inc()
                log.info("pool %s/%s: deleted %s (%s)", self.namespace, self.name, delete.pod, delete.reason)
        for resize in result.resizes:
            body = {"spec": {"containers": [{"name": resize.container, "resources": resize.resources}]}}
            patch = self.kube.patch_namespaced_pod_resize(resize.pod, self.namespace, body)
            what = f"resizing {resize.pod} in place ({resize.reason})"
            if (await self._guard("resize", what, patch, gone_ok=True))[0] == "done":
                log.info("pool %s/%s: resized %s (%s)", self.namespace, self.name, resize.pod, resize.reason)
        for event in result.events:
            await self.event(event.type, event.reason, event.message)


class _Fenced(Exception):
    """This replica's leadership lapsed: apply stops before its next write."""


def with_queue_count(scraped: Metrics, count: Sample | None) -> Metrics:
    """What a cycle plans with: Prometheus' metrics, with the queue depth counted in Redis now
    when there is such a count (the default query on the default Redis). Both are the same number,
    the agents' tars_queue_depth is this count, but Prometheus' copy is up to a scrape interval
    (15 s by default) plus `interval` old: a rise must not wait for it, and a scrape that fell in a
    burst must not keep the pool growing for a backlog the agents took seconds ago. Redis not
    answering leaves Prometheus' value; a failed Prometheus read stays visible, and nothing scales
    on the Redis count alone then."""
    if count is None or scraped.queue_depth_error is not None:
        return scraped
    return replace(scraped, queue_depth=count)


def agent_state_source(
    spec: models.AgentPoolSpec | None, reader: AgentStateReader | None
) -> AgentStateReader | None:
    """Where a pool's agents' published state is read: agents publish to their pool's Redis and the
    operator reads the default one only, so a pool with a Redis of its own is asked over HTTP."""
    return reader if spec is not None and spec.redis is None else None


def says(current: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    """Whether a pool's status `current` already holds every field of `status` (the merge patch
    would change nothing). Compared with the watched copy, which follows our own writes within
    moments: one that has not arrived yet costs a write, never a lost one."""
    return all(current.get(field) == value for field, value in status.items())


def published_count_holds(pod: PodState, published: AgentState) -> bool:
    """Whether an agent's published in-flight count may stand for its GET /status answer.

    For a pod being drained, only a state published after the drain took effect: the agent takes
    no task after it, so that count misses none taken before and can only fall. An older one may
    predate a task taken just before the drain; deleting on it would cut that task off."""
    return pod.draining_since is None or published.draining


def _reports_work(pod: PodState) -> bool:
    """Whose in-flight count is worth asking: ready agents, and draining ones that still run."""
    return pod.ready or (pod.draining_since is not None and not pod.deleting and pod.phase == "Running")


async def _no_result() -> QueryResult:
    return QueryResult(None)


async def _no_stats() -> dict[str, Sample]:
    return {}


def memory_usage(stats: Mapping[str, Sample]) -> MemoryUsage | None:
    """The three numbers of queries.agent_memory_usage, or None unless all three came back."""
    if not all(stat in stats for stat in queries.MEMORY_STATS):
        return None
    p95, peak, samples = (stats[stat].value for stat in queries.MEMORY_STATS)
    return MemoryUsage(p95, peak, int(samples))
