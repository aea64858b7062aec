"""Tests of controller.py, the shell around the plan: faults of the API server and a lagging watch.

The Kubernetes API, Prometheus and the agents are in-memory fakes here (the e2e suite runs
the same shell against the real ones); the faults are what a real API server does under a
restart: disconnects half-way through a plan, 404s for pods already gone.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from e2e.harness import async_eventually
from factories import raw_spec
from prometheus_client import REGISTRY

from tars_operator import builders, queries
from tars_operator.controller import METRICS_WAIT_S, AgentPod, PoolController, with_queue_count
from tars_operator.kubeclient import ApiError
from tars_operator.leader import Fence
from tars_operator.policy.metrics import MemoryUsage, Metrics, Sample
from tars_operator.policy.observe import PodState
from tars_operator.sources import AgentState, PoolReading, QueryResult

NOW = dt.datetime.now(dt.UTC)


@dataclass
class FakeCore:
    """The pod calls of KubeApi; `failures` maps a call name to the errors its next calls raise."""

    failures: dict[str, list[BaseException]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    created: int = 0

    def _fail(self, call: str) -> None:
        errors = self.failures.get(call)
        if errors:
            raise errors.pop(0)

    async def create_namespaced_pod(self, namespace: str, body: Mapping[str, Any]) -> Any:
        self._fail("create")
        self.created += 1
        name = f"{body['metadata']['generateName']}{self.created:05d}"
        self.calls.append(("create", name))
        return {"metadata": {"name": name}}

    async def patch_namespaced_pod(self, name: str, namespace: str, body: Any) -> None:
        self._fail("patch")
        self.calls.append(("patch", name))

    async def delete_namespaced_pod(self, name: str, namespace: str, uid: str | None) -> None:
        self._fail("delete")
        self.calls.append(("delete", name))

    async def patch_namespaced_pod_resize(self, name: str, namespace: str, body: Any) -> None:
        self._fail("resize")
        self.calls.append(("resize", name))


@dataclass
class FakeCustom:
    """The pool's status subresource: a merge patch answered with the whole object, as the API does."""

    stored: dict[str, Any]
    failures: list[BaseException] = field(default_factory=list)
    writes: list[dict[str, Any]] = field(default_factory=list)

    async def patch_namespaced_agent_pool_status(
        self, name: str, namespace: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        if self.failures:
            raise self.failures.pop(0)
        self.writes.append(dict(status))
        self.stored = {**self.stored, "status": {**self.stored.get("status", {}), **status}}
        return self.stored


@dataclass
class FakeKube:
    """KubeApi as the controller uses it: the pods' calls go to `core`, the status to `custom`
    (looked up at each call, so a test can replace one of their methods)."""

    core: FakeCore
    custom: FakeCustom

    def __getattr__(self, call: str) -> Any:
        return getattr(self.custom if call.endswith("_agent_pool_status") else self.core, call)


class FakePrometheus:
    async def query(self, promql: str) -> QueryResult:
        return QueryResult(Sample(0.0, dt.datetime.now(dt.UTC)))

    async def query_by_label(self, promql: str, label: str) -> dict[str, Sample]:
        return {}


@dataclass
class FakeAgents:
    inflight_by_ip: dict[str, int] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)

    async def state(self, pod_ip: str | None) -> AgentState | None:
        self.asked.append(pod_ip or "")
        n = self.inflight_by_ip.get(pod_ip or "")
        return None if n is None else AgentState(inflight=n, draining=False)

    async def drain(self, pod_ip: str | None) -> str | None:
        return None


@dataclass
class Setup:
    controller: PoolController
    core: FakeCore
    custom: FakeCustom
    agents: FakeAgents
    events: list[tuple[str, str, str]]


def make(spec: dict[str, Any], status: dict[str, Any] | None = None) -> Setup:
    body = {"metadata": {"name": "p", "namespace": "ns", "uid": "pool-uid", "generation": 1}, "spec": spec}
    body["status"] = status or {}
    core, custom, agents = FakeCore(), FakeCustom(body), FakeAgents()
    events: list[tuple[str, str, str]] = []

    async def emit(kind: str, reason: str, message: str) -> None:
        events.append((kind, reason, message))

    controller = PoolController(
        name="p",
        namespace="ns",
        uid="pool-uid",
        kube=FakeKube(core, custom),  # type: ignore[arg-type]
        prometheus=FakePrometheus(),  # type: ignore[arg-type]
        agents=agents,  # type: ignore[arg-type]
        defaults=builders.OperatorDefaults(),
        emit=emit,
    )
    return Setup(controller, core, custom, agents, events)


def agent(name: str, **fields: Any) -> AgentPod:
    state = PodState(name=name, uid=f"uid-{name}", created=NOW - dt.timedelta(minutes=5), **fields)
    return AgentPod(name=name, uid=state.uid, ip=f"10.0.0.{len(name)}", owner_uid="pool-uid", state=state)


async def cycle(s: Setup, body: Mapping[str, Any], indexed: Sequence[AgentPod]) -> None:
    pods, by_name, _ = await s.controller.observe(indexed)
    await s.controller.cycle(body, pods, by_name)


def warnings(s: Setup) -> list[str]:
    return [reason for kind, reason, _ in s.events if kind == "Warning"]


def test_a_disconnect_half_way_through_the_creates_keeps_what_was_created_and_still_writes_status() -> None:
    s = make(raw_spec(warm={"min": 3}, replicas={"min": 3, "max": 5}))
    # The first create goes through, the second meets a disconnect (an API server restart).
    original = s.core.create_namespaced_pod
    attempts = 0

    async def create_then_disconnect(namespace: str, body: Mapping[str, Any]) -> Any:
        nonlocal attempts
        attempts += 1
        if attempts == 2:
            raise aiohttp.ServerDisconnectedError()
        return await original(namespace, body)

    s.core.create_namespaced_pod = create_then_disconnect  # type: ignore[method-assign]
    asyncio.run(cycle(s, s.custom.stored, []))

    created = [name for call, name in s.core.calls if call == "create"]
    assert len(created) == 1
    # The pod the API did create is expected: the next cycle does not create a duplicate for it.
    assert [e.pod for e in s.controller.state.expectations] == created
    assert len(s.custom.writes) == 1 and s.custom.writes[0]["desiredReplicas"] == 3
    assert "CreateFailed" in warnings(s)
    assert "Server disconnected" in next(m for _, r, m in s.events if r == "CreateFailed")


def test_the_decision_is_written_before_the_pods_it_creates() -> None:
    """Whoever watches the pool (kubectl, a dashboard, the benchmarks) never sees more agents than
    desiredReplicas: the status carries the decision before its pods exist, as an HPA writes a
    scale before the ReplicaSet adds pods."""
    s = make(raw_spec(warm={"min": 3}))
    seen: list[Any] = []
    original = s.core.create_namespaced_pod

    async def create(namespace: str, body: Mapping[str, Any]) -> Any:
        seen.append(s.custom.stored.get("status", {}).get("desiredReplicas"))
        return await original(namespace, body)

    s.core.create_namespaced_pod = create  # type: ignore[method-assign]
    asyncio.run(cycle(s, s.custom.stored, []))
    assert seen == [3, 3, 3]


def test_a_disconnect_on_the_status_write_is_a_warning_not_a_crash() -> None:
    s = make(raw_spec())
    s.custom.failures = [aiohttp.ClientConnectionError("connection reset")]
    asyncio.run(cycle(s, s.custom.stored, []))
    assert "StatusFailed" in warnings(s)
    assert len(s.core.calls) == 2  # the warm floor was still created


def test_deleting_a_pod_that_is_already_gone_is_not_a_warning() -> None:
    s = make(raw_spec(warm={"min": 0}, replicas={"min": 0, "max": 5}))
    s.core.failures["delete"] = [ApiError(404, "Not Found")]
    finished = agent("p-aaaaa", phase="Failed", ready=False)
    asyncio.run(cycle(s, s.custom.stored, [finished]))
    assert warnings(s) == []


def test_an_oom_kill_is_answered_once_even_when_the_watch_lags_behind_the_status_write() -> None:
    spec = raw_spec(memory={"mode": "Auto", "min": "64Mi", "max": "1Gi"})
    s = make(spec, {"memoryLimit": "100Mi"})
    stale = dict(s.custom.stored)  # the watch keeps delivering this copy: it lags the write
    killed = agent(
        "p-aaaaa",
        inflight=0,
        memory_limit=100 * 2**20,
        last_oom=NOW - dt.timedelta(seconds=30),
        phase="Running",
    )
    asyncio.run(cycle(s, stale, [killed]))
    assert s.custom.writes[0]["memoryLimit"] == "150Mi"
    # The pod was resized in place (its limit is the new one, its record of the kill stays).
    resized = replace(killed, state=replace(killed.state, memory_limit=150 * 2**20))
    asyncio.run(cycle(s, stale, [resized]))
    assert s.custom.writes[1]["memoryLimit"] == "150Mi"
    assert [r for _, r, _ in s.events if r.startswith("MemoryLimit")] == ["MemoryLimitOOMKilled"]


def test_a_resize_is_one_patch_and_one_event_until_the_pod_shows_its_new_limit() -> None:
    spec = raw_spec(memory={"mode": "Auto", "min": "64Mi", "max": "1Gi"})
    s = make(spec, {"memoryLimit": "128Mi"})
    old = agent("p-aaaaa", inflight=0, memory_limit=256 * 2**20)
    for _ in range(3):  # the pod keeps showing its old limit (the kubelet has not acted yet)
        asyncio.run(cycle(s, s.custom.stored, [old]))
    assert [c for c in s.core.calls if c[0] == "resize"] == [("resize", "p-aaaaa")]
    assert [r for _, r, _ in s.events if r == "Resizing"] == ["Resizing"]


def test_a_draining_agent_is_still_asked_for_its_work_so_it_goes_as_soon_as_it_is_idle() -> None:
    s = make(raw_spec(warm={"min": 0}, replicas={"min": 0, "max": 5}))
    draining = agent("p-aaaaa", ready=False, draining_since=NOW - dt.timedelta(seconds=5))
    s.agents.inflight_by_ip[draining.ip or ""] = 0
    asyncio.run(cycle(s, s.custom.stored, [draining]))
    assert ("delete", "p-aaaaa") in s.core.calls


def test_the_spec_is_parsed_once_per_generation() -> None:
    s = make(raw_spec(scaling={"interval": "1h30m"}))
    body = s.custom.stored
    first = s.controller.checked(body)
    assert s.controller.checked(dict(body)) is first  # the loop asks every second: no re-parse
    parsed = first[0]
    assert parsed is not None and parsed.scaling.interval.delta == dt.timedelta(minutes=90)
    assert parsed.scaling.interval == "1h30m"  # still the text the user wrote, for the status and hash
    newer = {**body, "metadata": {**body["metadata"], "generation": 2}}
    assert s.controller.checked(newer) is not first


def test_a_replica_whose_leadership_lapsed_writes_nothing() -> None:
    s = make(raw_spec())
    s.controller.fence = Fence()  # never renewed: no authority
    asyncio.run(cycle(s, s.custom.stored, []))
    assert s.core.calls == [] and s.custom.writes == []
    assert s.controller.state.expectations == ()


def test_a_write_cannot_outlive_the_leaders_fence() -> None:
    s = make(raw_spec(warm={"min": 1}, replicas={"min": 1, "max": 5}))
    s.controller.fence = Fence(valid_until=time.monotonic() + 0.3)

    async def hung_create(namespace: str, body: Mapping[str, Any]) -> Any:
        await asyncio.sleep(60)  # an API server that never answers

    s.core.create_namespaced_pod = hung_create  # type: ignore[method-assign]
    started = time.monotonic()
    asyncio.run(cycle(s, s.custom.stored, []))
    # Cut off when the fence lapsed, and nothing after it was written: the decision went out
    # first, while the fence held; no Event (they follow the pod actions) after the hung create.
    assert time.monotonic() - started < 5
    assert [w["desiredReplicas"] for w in s.custom.writes] == [1]
    assert s.events == []


def test_the_decision_latency_runs_from_the_start_of_the_observation_to_the_plan_not_the_writes() -> None:
    s = make(raw_spec(warm={"min": 1}, replicas={"min": 1, "max": 5}))
    labels = {"namespace": "ns", "pool": "p"}

    def observed() -> tuple[float, float]:
        total = REGISTRY.get_sample_value("tars_operator_decision_seconds_sum", labels) or 0.0
        count = REGISTRY.get_sample_value("tars_operator_decision_seconds_count", labels) or 0.0
        return total, count

    original = s.core.create_namespaced_pod
    answer = asyncio.Event()

    async def unanswered_create(namespace: str, body: Mapping[str, Any]) -> Any:
        await answer.wait()  # an API server that has not answered yet
        return await original(namespace, body)

    s.core.create_namespaced_pod = unanswered_create  # type: ignore[method-assign]
    before_sum, before_count = observed()

    async def run() -> None:
        cycle = asyncio.create_task(
            s.controller.cycle(s.custom.stored, [], {}, observed_at=time.monotonic() - 2.0)
        )
        # observed while its first write still waits: the plan, not the writes, ends the latency
        await async_eventually(lambda: observed()[1] == before_count + 1, 5, "the decision observed")
        assert not cycle.done()
        answer.set()
        await cycle

    asyncio.run(run())
    after_sum, after_count = observed()
    assert after_count == before_count + 1
    assert 2.0 <= after_sum - before_sum < 2.9
    assert s.core.created == 1


@dataclass
class FakeAgentStates:
    """What agents published, by pod name; `fail`: Redis did not answer (read() returns None)."""

    states: dict[str, AgentState] = field(default_factory=dict)
    reads: list[list[str]] = field(default_factory=list)
    fail: bool = False
    depth: Sample | None = None  # the pool's queue depth in Redis
    depth_reads: int = 0

    async def read(self, namespace: str, pool: str, pods: Sequence[str], queue_depth: bool) -> PoolReading:
        self.reads.append(list(pods))
        self.depth_reads += queue_depth
        if self.fail:
            return PoolReading(None)
        return PoolReading(
            {p: self.states[p] for p in pods if p in self.states}, self.depth if queue_depth else None
        )


def test_published_states_replace_the_status_polls_and_only_agents_without_one_are_asked() -> None:
    s = make(raw_spec(warm={"min": 2}, replicas={"min": 0, "max": 5}))
    published, silent, starting = agent("p-aaaaa"), agent("p-bbbbbbb"), agent("p-cc", ready=False)
    states = FakeAgentStates({"p-aaaaa": AgentState(inflight=2, draining=False, slots=25)})
    s.controller.agent_states = states  # type: ignore[assignment]
    s.agents.inflight_by_ip[silent.ip or ""] = 0
    pods, _, _ = asyncio.run(s.controller.observe([published, silent, starting]))
    assert states.reads == [["p-aaaaa", "p-bbbbbbb"]]  # one read for the pool's working agents
    assert s.agents.asked == [silent.ip]  # GET /status only where nothing was published
    assert [p.inflight for p in pods] == [2, 0, None]
    assert [p.slots for p in pods] == [25, None, None]  # the published slots reach the policy


def test_a_draining_agents_published_count_stands_only_once_it_says_it_is_draining() -> None:
    s = make(raw_spec(warm={"min": 0}, replicas={"min": 0, "max": 5}))
    # Drained 5 s ago by the clock the plan reads (not NOW, taken at import): far from its timeout.
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    draining = agent("p-aaaaa", ready=False, draining_since=since)
    states = FakeAgentStates({"p-aaaaa": AgentState(inflight=0, draining=False)})
    s.controller.agent_states = states  # type: ignore[assignment]
    # Published before the drain took effect: it may miss a task taken just before. Ask the agent.
    s.agents.inflight_by_ip[draining.ip or ""] = 1
    asyncio.run(cycle(s, s.custom.stored, [draining]))
    assert s.agents.asked == [draining.ip]
    assert ("delete", "p-aaaaa") not in s.core.calls
    # Published after the drain, with nothing in flight: done, without asking the agent.
    states.states["p-aaaaa"] = AgentState(inflight=0, draining=True)
    s.agents.asked.clear()
    asyncio.run(cycle(s, s.custom.stored, [draining]))
    assert s.agents.asked == []
    assert ("delete", "p-aaaaa") in s.core.calls


def test_when_the_published_states_cannot_be_read_every_count_is_unknown_without_a_poll_storm() -> None:
    s = make(raw_spec(warm={"min": 0}, replicas={"min": 0, "max": 5}))
    pods = [agent("p-aaaaa"), agent("p-bbbbbbb")]
    s.controller.agent_states = FakeAgentStates(fail=True)  # type: ignore[assignment]
    observed, _, _ = asyncio.run(s.controller.observe(pods))
    assert s.agents.asked == []  # no GET /status per agent while Redis (or we) are overloaded
    assert [p.inflight for p in observed] == [None, None]  # unknown: never read as idle
    asyncio.run(cycle(s, s.custom.stored, pods))
    assert not [c for c in s.core.calls if c[0] in ("patch", "delete")]  # nothing scaled in on it


@dataclass
class FailingPrometheus(FakePrometheus):
    async def query(self, promql: str) -> QueryResult:
        return QueryResult(None, "query failed: connection refused")


def test_a_queue_crossing_seen_in_redis_is_planned_at_once_with_the_redis_value() -> None:
    """Prometheus still says 0 (its last scrape), Redis says 400: the crossing is seen, and the
    cycle it starts plans with 400, not with the stale 0."""
    s = make(raw_spec(warm={"min": 1}, replicas={"min": 1, "max": 10}))  # threshold 50, interval 10 s
    states = FakeAgentStates(depth=Sample(400.0, dt.datetime.now(dt.UTC)))
    s.controller.agent_states = states  # type: ignore[assignment]
    parsed = s.controller.checked(s.custom.stored)[0]
    pods, by_name, depth = asyncio.run(s.controller.observe([], parsed))
    assert depth is not None and depth.value == 400
    assert s.controller.queue_crossed(parsed, depth)
    asyncio.run(s.controller.cycle(s.custom.stored, pods, by_name, queue_depth=depth))
    status = s.custom.writes[-1]
    assert status["queueDepth"] == 400
    assert status["desiredReplicas"] > 1
    assert not s.controller.queue_crossed(parsed, depth)  # planned with it: no new crossing
    assert s.controller.queue_crossed(parsed, Sample(10.0, dt.datetime.now(dt.UTC)))  # back under


@dataclass
class MidBurstPrometheus(FakePrometheus):
    """Its last scrape of the agents' tars_queue_depth fell in a burst that has drained since."""

    async def query(self, promql: str) -> QueryResult:
        if "tars_queue_depth" in promql:
            return QueryResult(Sample(280.0, dt.datetime.now(dt.UTC)))
        return await super().query(promql)


def test_a_drained_burst_seen_in_redis_creates_no_agents_on_prometheus_older_count() -> None:
    """Prometheus scrapes the agents every 15 s (the chart's default): a scrape in a burst kept the
    pool growing for a backlog the agents had already taken, 3 more pod starts in a 300-task burst
    (bench/warm_pickup.py), each one CPU the busy agents needed. Redis counts the same queue now."""
    s = make(raw_spec(warm={"min": 1}, replicas={"min": 1, "max": 10}))  # threshold 50
    s.controller.prometheus = MidBurstPrometheus()  # type: ignore[assignment]
    idle = {"p-a": AgentState(inflight=0, draining=False)}
    s.controller.agent_states = FakeAgentStates(idle, depth=Sample(0.0, dt.datetime.now(dt.UTC)))  # type: ignore[assignment]
    parsed = s.controller.checked(s.custom.stored)[0]
    indexed = [agent("p-a", ready=True)]
    pods, by_name, depth = asyncio.run(s.controller.observe(indexed, parsed))
    asyncio.run(s.controller.cycle(s.custom.stored, pods, by_name, queue_depth=depth))
    status = s.custom.writes[-1]
    assert (status["queueDepth"], status["desiredReplicas"]) == (0, 1)
    assert "ScaledUp" not in {reason for _, reason, _ in s.events}


def test_a_pools_agents_and_its_queue_are_read_from_redis_in_one_round_trip() -> None:
    s = make(raw_spec(warm={"min": 1}, replicas={"min": 1, "max": 10}))
    states = FakeAgentStates({"p-a": AgentState(inflight=1, draining=False)}, depth=Sample(3.0, NOW))
    s.controller.agent_states = states  # type: ignore[assignment]
    parsed = s.controller.checked(s.custom.stored)[0]
    pods, _, depth = asyncio.run(s.controller.observe([agent("p-a", ready=True)], parsed))
    assert [p.inflight for p in pods] == [1] and depth == Sample(3.0, NOW)
    assert (states.reads, states.depth_reads) == ([["p-a"]], 1)


def test_the_queue_depth_comes_from_redis_only_where_that_is_what_the_pools_query_measures() -> None:
    s = make(raw_spec(scaling={"queueDepth": {"query": "sum(my_queue)"}}))
    states = FakeAgentStates(depth=Sample(400.0, dt.datetime.now(dt.UTC)))
    s.controller.agent_states = states  # type: ignore[assignment]
    parsed = s.controller.checked(s.custom.stored)[0]
    assert asyncio.run(s.controller.observe([], parsed)).queue_depth is None  # its own query: Prometheus
    assert states.depth_reads == 0
    s.controller.agent_states = None  # a pool on a Redis of its own (agent_state_source)
    assert asyncio.run(s.controller.observe([], parsed)).queue_depth is None


def test_a_failing_prometheus_stays_visible_although_redis_knows_the_queue() -> None:
    s = make(raw_spec(warm={"min": 1}, replicas={"min": 1, "max": 10}))
    s.controller.prometheus = FailingPrometheus()  # type: ignore[assignment]
    depth = Sample(400.0, dt.datetime.now(dt.UTC))
    pods, by_name, _ = asyncio.run(s.controller.observe([]))
    asyncio.run(s.controller.cycle(s.custom.stored, pods, by_name, queue_depth=depth))
    status = s.custom.writes[-1]
    assert "queueDepth" not in status or status["queueDepth"] != 400
    assert any("connection refused" in c.get("message", "") for c in status.get("conditions", [])), status


def test_an_unchanged_queue_read_from_redis_every_second_leaves_the_status_as_it_was() -> None:
    """Each status write that changes the object comes back as a watch event that wakes the pool's
    loop: a sample time that moved on every cycle made a loop of ~15 writes a second per pool.
    The same count, read again (now, as from Redis), changes nothing and is not written again."""
    s = make(raw_spec(warm={"min": 0}, replicas={"min": 0, "max": 10}))  # nothing to create
    pods, by_name, _ = asyncio.run(s.controller.observe([]))
    for _ in range(3):
        now = dt.datetime.now(dt.UTC)
        asyncio.run(s.controller.cycle(s.custom.stored, pods, by_name, queue_depth=Sample(30.0, now)))
    assert len(s.custom.writes) == 1 and s.custom.writes[0]["queueDepth"] == 30
    now = dt.datetime.now(dt.UTC)
    asyncio.run(s.controller.cycle(s.custom.stored, pods, by_name, queue_depth=Sample(31.0, now)))
    assert s.custom.writes[-1]["queueDepth"] == 31


_AT = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("scraped", "count", "planned"),
    [
        (Metrics(queue_depth=Sample(0.0, _AT)), Sample(400.0, _AT), 400.0),  # a rise: at once
        (Metrics(queue_depth=Sample(280.0, _AT)), Sample(0.0, _AT), 0.0),  # a fall: at once too
        (Metrics(), Sample(30.0, _AT), 30.0),  # no series yet
        (Metrics(queue_depth=Sample(5.0, _AT)), None, 5.0),  # Redis did not answer
        (Metrics(queue_depth_error="connection refused"), Sample(400.0, _AT), None),  # stays visible
    ],
)
def test_the_queue_planned_with_is_the_count_in_redis_and_prometheus_only_without_one(
    scraped: Metrics, count: Sample | None, planned: float | None
) -> None:
    got = with_queue_count(scraped, count).queue_depth
    assert (got.value if got else None) == planned


@dataclass
class SlowPrometheus(FakePrometheus):
    """Answers once every query it was sent is waiting: a reader that sends them one after the
    other never gets an answer (and the test times out)."""

    expected: int = 4
    waiting: int = 0
    all_sent: asyncio.Event = field(default_factory=asyncio.Event)

    async def _answer(self) -> None:
        self.waiting += 1
        if self.waiting == self.expected:
            self.all_sent.set()
        await asyncio.wait_for(self.all_sent.wait(), 5)

    async def query(self, promql: str) -> QueryResult:
        await self._answer()
        return QueryResult(Sample(1.0, dt.datetime.now(dt.UTC)))

    async def query_by_label(self, promql: str, label: str) -> dict[str, Sample]:
        await self._answer()
        return {stat: Sample(2.0, dt.datetime.now(dt.UTC)) for stat in queries.MEMORY_STATS}


def test_a_pools_queries_go_to_prometheus_together_not_one_after_the_other() -> None:
    """At 100 pools a cycle's Prometheus reads are most of its decision latency: queue depth,
    budget, limiter wait and memory take one round trip."""
    spec = raw_spec(rateLimit={"budget": "openai"}, memory={"mode": "Auto", "min": "64Mi", "max": "1Gi"})
    s = make(spec)

    async def read() -> Metrics:
        s.controller.prometheus = SlowPrometheus()  # type: ignore[assignment]
        parsed = s.controller.checked(s.custom.stored)[0]
        assert parsed is not None
        return await s.controller.read_metrics(parsed)

    metrics = asyncio.run(read())
    assert metrics.queue_depth is not None and metrics.budget_utilization is not None
    assert metrics.limiter_wait_seconds is not None and metrics.memory == MemoryUsage(2.0, 2.0, 2)


@dataclass
class AgingPrometheus:
    """Answers every query with `depth`, sampled `age` seconds before now."""

    depth: float = 0.0
    age: float = 0.0

    async def query(self, promql: str) -> QueryResult:
        return QueryResult(Sample(self.depth, dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self.age)))

    async def query_by_label(self, promql: str, label: str) -> dict[str, Sample]:
        return {}


def test_a_pool_whose_status_would_not_change_sends_no_write() -> None:
    """At 100 pools a write per pool and interval was ~10 status writes a second to the API server
    and etcd, each echoed back to the operator as a watch event, for a status saying the same."""
    s = make(raw_spec(warm={"min": 0}, replicas={"min": 0, "max": 5}))
    prometheus = AgingPrometheus()
    s.controller.prometheus = prometheus  # type: ignore[assignment]

    def cycle_reading(depth: float, age: float) -> None:
        prometheus.depth, prometheus.age = depth, age
        s.controller.metrics_read_at = float("-inf")  # the interval has passed: Prometheus is read
        asyncio.run(cycle(s, s.custom.stored, []))

    cycle_reading(0, age=0)
    assert len(s.custom.writes) == 1
    # The same queue, sampled at another moment (Prometheus scrapes every few seconds).
    cycle_reading(0, age=3)
    cycle_reading(0, age=1)
    assert len(s.custom.writes) == 1, [w for w in s.custom.writes[1:]]
    cycle_reading(7, age=1)  # a new count is news
    assert len(s.custom.writes) == 2 and s.custom.writes[1]["queueDepth"] == 7


@dataclass
class CountingPrometheus:
    """Counts the memory summaries asked for; every other query answers 0, sampled now."""

    memory_reads: int = 0

    async def query(self, promql: str) -> QueryResult:
        return QueryResult(Sample(0.0, dt.datetime.now(dt.UTC)))

    async def query_by_label(self, promql: str, label: str) -> dict[str, Sample]:
        self.memory_reads += 1
        return {stat: Sample(2.0**27, dt.datetime.now(dt.UTC)) for stat in queries.MEMORY_STATS}


def test_the_agents_memory_is_summed_up_once_a_minute_not_every_interval() -> None:
    """Each summary makes Prometheus evaluate the memory window three times over: at 100 pools
    and a 10 s interval that took most of its CPU. Between summaries the last one stands."""
    spec = raw_spec(memory={"mode": "Recommend", "window": "1h"}, scaling={"interval": "10s"})
    s = make(spec)
    prometheus = CountingPrometheus()
    s.controller.prometheus = prometheus  # type: ignore[assignment]
    parsed = s.controller.checked(s.custom.stored)[0]
    assert parsed is not None

    reads = [asyncio.run(s.controller.read_metrics(parsed)) for _ in range(3)]
    assert prometheus.memory_reads == 1
    assert all(m.memory == MemoryUsage(2.0**27, 2.0**27, 2**27) for m in reads)
    s.controller.memory_read_at -= 60  # a minute later
    asyncio.run(s.controller.read_metrics(parsed))
    assert prometheus.memory_reads == 2


@dataclass
class HangingPrometheus:
    """Answers at once until `hang` is set; then every query waits until `release` is."""

    hang: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def query(self, promql: str) -> QueryResult:
        if self.hang:
            await self.release.wait()
        return QueryResult(Sample(0.0, dt.datetime.now(dt.UTC)))

    async def query_by_label(self, promql: str, label: str) -> dict[str, Sample]:
        return {}


async def test_a_hung_prometheus_does_not_hold_up_a_scale_up_that_redis_shows() -> None:
    """Prometheus answers within its timeout (5 s) or not at all: a cycle that waited that long
    for it left the pool deaf to its queue that long. The queue crossing Redis shows is planned
    at once with the metrics read before; the late answer, when it comes, starts a cycle."""
    s = make(raw_spec(warm={"min": 1}, replicas={"min": 1, "max": 10}))  # threshold 50
    prometheus = HangingPrometheus()
    s.controller.prometheus = prometheus  # type: ignore[assignment]
    arrived = asyncio.Event()
    s.controller.metrics_arrived = arrived.set
    pods, by_name, _ = await s.controller.observe([])
    await s.controller.cycle(s.custom.stored, pods, by_name)  # the first read: answered at once
    assert s.custom.writes[-1]["desiredReplicas"] == 1

    prometheus.hang = True
    s.controller.metrics_read_at -= 10  # an interval (10 s) later: a read is due
    deep = Sample(400.0, dt.datetime.now(dt.UTC))
    async with asyncio.timeout(2 * METRICS_WAIT_S):
        await s.controller.cycle(s.custom.stored, pods, by_name, queue_depth=deep)
    assert s.custom.writes[-1]["desiredReplicas"] > 1, "scaled up on Redis' count, without Prometheus"
    assert not arrived.is_set()
    prometheus.release.set()
    async with asyncio.timeout(5):
        await arrived.wait()  # the loop is woken for a cycle with what Prometheus said
