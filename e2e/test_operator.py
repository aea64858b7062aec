"""The AgentPool operator as users run it: installed by the chart, in-cluster under the chart's
RBAC, reading the cluster's Prometheus (fed by the chart's PodMonitor).

Agents here are e2e/programs/fake_agent.py in the agent image: the agent side of the
contract (/status, /drain, /readyz, tars_agent_busy, tars_queue_depth) with a remote
control for busy-ness, beside a backlog of placeholder tasks a test puts in the pool's queue
streams, so each test sets the exact situation it checks."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from e2e.harness import (
    PROGRAMS_VOLUME,
    Kube,
    condition,
    eventually,
    program_container,
    unique,
)
from e2e.operator_env import OperatorEnv
from tars_contract import contract
from tars_operator import builders
from tars_operator.units import parse_quantity


def agent_pool(name: str, **spec: Any) -> dict[str, Any]:
    # No securityContext and no /tmp: the operator adds both to agent containers itself.
    container = program_container("agent", "fake_agent.py")
    return {
        "apiVersion": "tars.dev/v1alpha1",
        "kind": "AgentPool",
        "metadata": {"name": name},
        "spec": {
            "template": {
                "spec": {
                    "containers": [container],
                    "volumes": [PROGRAMS_VOLUME],
                }
            },
            **spec,
        },
    }


def live_pods(kube: Kube, namespace: str, pool: str) -> list[dict[str, Any]]:
    return [
        p
        for p in kube.pods(namespace, f"{contract.POOL_LABEL}={pool}")
        if not p["metadata"].get("deletionTimestamp")
    ]


def ready_active(kube: Kube, namespace: str, pool: str) -> list[dict[str, Any]]:
    return [
        p
        for p in live_pods(kube, namespace, pool)
        if condition(p, "Ready") == "True"
        and contract.DRAINING_ANNOTATION not in p["metadata"].get("annotations", {})
    ]


def wait_ready_agents(
    kube: Kube, namespace: str, pool: str, n: int, timeout: float = 60
) -> list[dict[str, Any]]:
    """Wait until exactly `n` agents of the pool are ready and not draining; return them."""

    def exactly_n() -> list[dict[str, Any]] | None:
        pods = ready_active(kube, namespace, pool)
        return pods if len(pods) == n else None

    return eventually(exactly_n, timeout, f"{n} ready agents in pool {pool}")


def wait_status(
    kube: Kube, namespace: str, pool: str, key: str, value: Any, timeout: float = 30
) -> dict[str, Any]:
    def matches() -> dict[str, Any] | None:
        status = pool_status(kube, namespace, pool)
        return status if status.get(key) == value else None

    return eventually(matches, timeout, f"status.{key} == {value!r} of pool {pool}")


def set_busy(kube: Kube, pod: dict[str, Any], inflight: int) -> None:
    meta = pod["metadata"]
    kube.pod_post(meta["namespace"], meta["name"], contract.HTTP_PORT, f"/test/busy?n={inflight}")


def pool_ref(kube: Kube, namespace: str, pool: str) -> builders.PoolRef:
    return builders.PoolRef(pool, namespace, kube.get("agentpool", pool, namespace)["metadata"]["uid"])


def pool_token(kube: Kube, namespace: str, pool: str) -> str:
    """The token the operator put in the pool's Secret (its agents require it on /status, /drain)."""
    name = builders.pool_secret_name(pool_ref(kube, namespace, pool))
    return kube.secret_value(namespace, name, builders.SECRET_AGENT_TOKEN)


def agent_status(kube: Kube, pod: dict[str, Any]) -> dict[str, Any]:
    meta = pod["metadata"]
    token = pool_token(kube, meta["namespace"], meta["labels"][contract.POOL_LABEL])
    response = kube.pod_request(
        meta["namespace"], meta["name"], contract.HTTP_PORT, "GET", contract.PATH_STATUS, token
    )
    assert response.status_code == 200, response.text
    status: dict[str, Any] = response.json()
    return status


def pool_status(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return kube.get("agentpool", name, namespace).get("status", {})


def events(kube: Kube, namespace: str, name: str) -> list[dict[str, Any]]:
    return [
        e for e in kube.get("events", namespace=namespace)["items"] if e["involvedObject"]["name"] == name
    ]


def test_warm_pool_replaces_an_agent_that_turns_busy_without_waiting_for_the_interval(
    op: OperatorEnv, namespace: str
) -> None:
    kube = op.kube
    # A long interval: only the busy signal can explain a quick replacement.
    kube.apply(
        agent_pool("warm", replicas={"min": 1, "max": 5}, warm={"min": 2}, scaling={"interval": "60s"}),
        namespace=namespace,
    )
    first = wait_ready_agents(kube, namespace, "warm", 2, 90)
    status = wait_status(kube, namespace, "warm", "warm", 2, 30)
    assert status["desiredReplicas"] == 2 and condition({"status": status}, "Ready") == "True"

    set_busy(kube, first[0], 1)
    # 2 idle agents again on top of the busy one, well before the 60 s interval.
    wait_ready_agents(kube, namespace, "warm", 3, 30)
    status = wait_status(kube, namespace, "warm", "busy", 1, 30)
    assert status["desiredReplicas"] == 3
    pool_events = events(kube, namespace, "warm")
    assert any(e["reason"] == "ScaledUp" for e in pool_events)
    assert {e["source"].get("component") for e in pool_events} == {"tars-operator"}
    # A repeat is counted on the first Event (as the kubelet's are), never posted again.
    keys = [(e["type"], e["reason"], e["message"]) for e in pool_events]
    assert len(keys) == len(set(keys)), keys
    metrics = op.metrics()
    created = f'tars_operator_pods_created_total{{namespace="{namespace}",pool="warm",reason="scale-up"}} 3.0'
    assert created in metrics
    assert f'tars_operator_desired_replicas{{namespace="{namespace}",pool="warm"}} 3.0' in metrics
    pods = live_pods(kube, namespace, "warm")
    owner = pods[0]["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "AgentPool" and owner["name"] == "warm" and owner["controller"] is True
    # Agents run as the "restricted" Pod Security level demands (the namespace enforces it).
    spec = pods[0]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def reconcile_count(op: OperatorEnv, namespace: str, pool: str) -> float:
    """How many reconcile cycles the leading operator ran for a pool (from its own /metrics)."""
    prefix = f'tars_operator_reconcile_seconds_count{{namespace="{namespace}",pool="{pool}"}} '
    return sum(float(line[len(prefix) :]) for line in op.metrics().splitlines() if line.startswith(prefix))


def wait_cycles(op: OperatorEnv, namespace: str, pool: str, cycles: int = 5) -> None:
    """Let the operator reconcile the pool `cycles` more times (a way to watch it hold, without sleeping)."""
    before = reconcile_count(op, namespace, pool)
    eventually(
        lambda: reconcile_count(op, namespace, pool) >= before + cycles, 60, f"{cycles} more reconcile cycles"
    )


def queue_in_prometheus(op: OperatorEnv, namespace: str, pool: str) -> float | None:
    """The pool's queue depth as Prometheus has it now (the operator's default query)."""
    result = op.prometheus.query(
        f'sum(max by (priority) (tars_queue_depth{{namespace="{namespace}",pool="{pool}"}}))'
    )
    return float(result[0]["value"][1]) if result else None


def fast_scaling(**overrides: Any) -> dict[str, Any]:
    scaling = {
        "interval": "2s",
        "queueDepth": {"threshold": 5, "targetPerAgent": 2},
        "scaleDown": {"stabilizationWindow": "6s"},
    }
    scaling.update(overrides)
    return scaling


def test_queue_depth_scales_up_and_scale_in_removes_only_idle_agents(op: OperatorEnv, namespace: str) -> None:
    kube = op.kube
    op.set_queue(namespace, "scale", 0)
    kube.apply(
        agent_pool("scale", replicas={"min": 1, "max": 6}, warm={"min": 1}, scaling=fast_scaling()),
        namespace=namespace,
    )
    wait_ready_agents(kube, namespace, "scale", 1, 90)
    op.set_queue(namespace, "scale", 9)  # 4 above the threshold of 5 -> 2 extra (targetPerAgent 2)
    # The operator counts the queue in Redis itself; the agents' tars_queue_depth must reach
    # Prometheus too (dashboards and alerts read it), through the chart's PodMonitor, installed with
    # this module, prometheus-operator's config Secret and its reloader: up to a minute.
    eventually(
        lambda: queue_in_prometheus(op, namespace, "scale") == 9, 120, "Prometheus scraping the queue of 9"
    )
    wait_ready_agents(kube, namespace, "scale", 3, 60)
    status = wait_status(kube, namespace, "scale", "queueDepth", 9, 30)
    assert status["desiredReplicas"] == 3

    busy = ready_active(kube, namespace, "scale")[0]
    set_busy(kube, busy, 2)
    eventually(
        lambda: len(ready_active(kube, namespace, "scale")) == 4, 60, "a 4th agent beside the busy one"
    )

    op.set_queue(namespace, "scale", 0)  # desired: busy 1 + warm 1 = 2; the busy one survives
    seen_busy_draining = False

    def scaled_in() -> bool:
        nonlocal seen_busy_draining
        pods = kube.pods(namespace, f"{contract.POOL_LABEL}=scale")
        me = [p for p in pods if p["metadata"]["name"] == busy["metadata"]["name"]]
        if (
            not me
            or me[0]["metadata"].get("deletionTimestamp")
            or contract.DRAINING_ANNOTATION in me[0]["metadata"].get("annotations", {})
        ):
            seen_busy_draining = True
        return len(live_pods(kube, namespace, "scale")) == 2

    eventually(scaled_in, 90, "scale-in to 2 agents")
    assert not seen_busy_draining, "scale-in drained or deleted the busy agent"
    names = {p["metadata"]["name"] for p in live_pods(kube, namespace, "scale")}
    assert busy["metadata"]["name"] in names
    reasons = {e["reason"] for e in events(kube, namespace, "scale")}
    assert {"ScaledUp", "ScaledDown"} <= reasons


def set_prometheus_replicas(op: OperatorEnv, replicas: int) -> None:
    """Scale the Prometheus custom resource behind the suite's Prometheus Service (its namespace's one)."""
    (name,) = op.kube.run("get", "prometheus", "-n", op.prometheus.namespace, "-o", "name").stdout.split()
    op.kube.run(
        "patch",
        name,
        "-n",
        op.prometheus.namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"replicas": replicas}}),
    )


def test_a_prometheus_outage_holds_the_pool_and_it_recovers(op: OperatorEnv, namespace: str) -> None:
    kube = op.kube
    op.set_queue(namespace, "outage", 9)
    kube.apply(
        agent_pool("outage", replicas={"min": 1, "max": 6}, warm={"min": 1}, scaling=fast_scaling()),
        namespace=namespace,
    )
    wait_ready_agents(kube, namespace, "outage", 3, 90)
    op.set_queue(namespace, "outage", 0)
    set_prometheus_replicas(op, 0)  # the cluster's Prometheus goes away, as in a real outage
    try:

        def unavailable() -> dict[str, Any] | None:
            for c in pool_status(kube, namespace, "outage").get("conditions", []):
                if c["type"] == "MetricsAvailable" and c["status"] == "False":
                    return c
            return None

        cond = eventually(unavailable, 60, "MetricsAvailable=False")
        assert cond["reason"] == "QueryFailed"
        assert op.prometheus.in_cluster_url in cond["message"], (
            "the error names the Prometheus it could not reach"
        )
        eventually(
            lambda: (
                "MetricsUnavailableHold"
                in pool_status(kube, namespace, "outage").get("lastDecisionReason", "")
            ),
            30,
            "a Hold decision",
        )
        # Cycles without data for longer than the 6 s stabilization window: the pool holds.
        wait_cycles(op, namespace, "outage")
        assert len(live_pods(kube, namespace, "outage")) == 3
    finally:
        set_prometheus_replicas(op, 1)
    eventually(
        lambda: condition({"status": pool_status(kube, namespace, "outage")}, "MetricsAvailable") == "True",
        120,
        "MetricsAvailable=True after Prometheus is back",
    )
    # With the queue empty again, the pool returns to its floor by itself.
    eventually(lambda: len(live_pods(kube, namespace, "outage")) == 1, 90, "scale-in to the warm floor")


def test_a_spec_the_schema_cannot_refuse_is_reported_and_no_pod_is_touched(
    op: OperatorEnv, namespace: str
) -> None:
    kube = op.kube
    kube.apply(
        agent_pool("broken", scaling={"queueDepth": {"query": "sum(rate(tars_queue_depth[1m])"}}),
        namespace=namespace,
    )

    def spec_invalid() -> dict[str, Any] | None:
        for c in pool_status(kube, namespace, "broken").get("conditions", []):
            if c["type"] == "SpecValid" and c["status"] == "False":
                return c
        return None

    cond = eventually(spec_invalid, 30, "SpecValid=False")
    assert "spec.scaling.queueDepth.query" in cond["message"] and "unclosed" in cond["message"]
    assert any(
        e["type"] == "Warning" and "SpecValid=False" in e["message"]
        for e in events(kube, namespace, "broken")
    )
    assert kube.pods(namespace, f"{contract.POOL_LABEL}=broken") == []
    # Fixing the query brings the pool up.
    kube.run(
        "patch",
        "ap",
        "broken",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"scaling": {"queueDepth": {"query": "sum(tars_queue_depth)"}}}}',
    )
    wait_ready_agents(kube, namespace, "broken", 3, 90)


def test_deleting_the_pool_garbage_collects_its_agents(op: OperatorEnv, namespace: str) -> None:
    kube = op.kube
    kube.apply(agent_pool("gone", warm={"min": 2}), namespace=namespace)
    wait_ready_agents(kube, namespace, "gone", 2, 90)
    kube.run("delete", "ap", "gone", "-n", namespace, "--wait=false")
    eventually(
        lambda: not kube.pods(namespace, f"{contract.POOL_LABEL}=gone"), 90, "the pool's pods to be collected"
    )


def test_pool_rotates_agents_after_their_ttl_replacement_ready_first(op: OperatorEnv, namespace: str) -> None:
    kube = op.kube
    kube.apply(
        agent_pool(
            "rotate",
            replicas={"min": 2, "max": 4},
            warm={"min": 2},
            rotation={"ttl": "15s", "jitter": "2s", "maxUnavailable": 1, "drainTimeout": "10s"},
        ),
        namespace=namespace,
    )
    originals = {p["metadata"]["name"] for p in wait_ready_agents(kube, namespace, "rotate", 2, 90)}
    lowest_ready = 2

    def rotated() -> bool:
        nonlocal lowest_ready
        pods = ready_active(kube, namespace, "rotate")
        lowest_ready = min(lowest_ready, len(pods))
        names = {p["metadata"]["name"] for p in live_pods(kube, namespace, "rotate")}
        return not (names & originals) and len(pods) >= 2

    eventually(rotated, 120, "both original agents replaced")
    assert lowest_ready >= 2, "a rotation left the pool with fewer ready agents than its floor"
    replaced = {e["message"] for e in events(kube, namespace, "rotate") if e["reason"] == "Rotating"}
    assert all(any(name in message for message in replaced) for name in originals), replaced


def scale_operator(op: OperatorEnv, replicas: int) -> None:
    op.kube.run("scale", "deployment", op.release, "-n", op.namespace, f"--replicas={replicas}")


def test_operator_crash_and_restart_converge_without_duplicate_or_orphaned_agents(
    op: OperatorEnv, namespace: str
) -> None:
    kube = op.kube
    kube.apply(agent_pool("restart", warm={"min": 3}), namespace=namespace)
    before = {p["metadata"]["name"] for p in wait_ready_agents(kube, namespace, "restart", 3, 90)}
    assert not kube.get("ap", "restart", namespace)["metadata"].get("finalizers"), "pools carry no finalizer"
    # A crash (no clean shutdown, as a node failure or an OOM kill), and no replacement for now.
    leader = op.wait_leader()
    scale_operator(op, 0)
    kube.run("delete", "pod", leader, "-n", op.namespace, "--grace-period=0", "--force")
    eventually(lambda: not op.pods(), 60, "no operator pod")
    # While no operator runs, a pool can still be deleted: nothing blocks it.
    kube.apply(agent_pool("orphan", warm={"min": 1}), namespace=namespace)
    kube.run("delete", "ap", "orphan", "-n", namespace, "--timeout=30s")

    scale_operator(op, 1)
    # The crashed leader never released its Lease: the new pod takes it when it expires.
    eventually(lambda: reconcile_count(op, namespace, "restart") >= 5, 90, "5 cycles of the new operator")
    after = {p["metadata"]["name"] for p in live_pods(kube, namespace, "restart")}
    assert after == before, "a restart must neither add nor remove agents of a settled pool"


def test_budget_saturation_stops_scale_up_until_headroom_returns(op: OperatorEnv, namespace: str) -> None:
    kube = op.kube
    op.set_queue(namespace, "budget", 0)
    op.set_budget_use(namespace, "budget", 0.99)
    pool = agent_pool(
        "budget",
        replicas={"min": 1, "max": 6},
        warm={"min": 1},
        scaling=fast_scaling(),
        rateLimit={"budget": unique("e2e-budget"), "requestsPerMinute": 600},
    )
    kube.apply(pool, namespace=namespace)
    wait_ready_agents(kube, namespace, "budget", 1, 90)
    eventually(
        lambda: condition({"status": pool_status(kube, namespace, "budget")}, "BudgetSaturated") == "True",
        60,
        "BudgetSaturated=True at 99 % budget use",
    )

    op.set_queue(namespace, "budget", 20)  # would ask for 6 agents (the max) ...
    eventually(lambda: pool_status(kube, namespace, "budget").get("queueDepth") == 20, 30, "the backlog seen")
    wait_cycles(op, namespace, "budget")
    assert len(live_pods(kube, namespace, "budget")) == 1, (
        "... but more agents would only wait at the limiter"
    )
    saturated = [e for e in events(kube, namespace, "budget") if "BudgetSaturated=True" in e["message"]]
    assert saturated and saturated[0]["type"] == "Warning"

    op.set_budget_use(namespace, "budget", 0.5)  # headroom again
    wait_ready_agents(kube, namespace, "budget", 6, 120)
    assert condition({"status": pool_status(kube, namespace, "budget")}, "BudgetSaturated") == "False"


def test_unschedulable_agents_are_reported_not_replaced_again_and_again(
    op: OperatorEnv, namespace: str
) -> None:
    kube = op.kube
    pool = agent_pool("nowhere", warm={"min": 2}, scaling=fast_scaling())
    pool["spec"]["template"]["spec"]["nodeSelector"] = {"tars.dev/no-such-node": "true"}
    kube.apply(pool, namespace=namespace)

    def unschedulable() -> dict[str, Any] | None:
        status = pool_status(kube, namespace, "nowhere")
        return status if status.get("unschedulable") == 2 else None

    status = eventually(unschedulable, 60, "status.unschedulable == 2")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "Unschedulable"
    wait_cycles(op, namespace, "nowhere")
    pods = kube.pods(namespace, f"{contract.POOL_LABEL}=nowhere")
    assert len(pods) == 2, "pods that cannot be scheduled must not be replaced by more of the same"
    assert all(p["status"]["phase"] == "Pending" for p in pods)


def agent_limits(kube: Kube, namespace: str, pool: str) -> set[str]:
    return {
        p["spec"]["containers"][0]["resources"]["limits"]["memory"]
        for p in ready_active(kube, namespace, pool)
    }


def test_memory_right_sizing_resizes_running_agents_in_place_and_bumps_after_an_oom_kill(
    op: OperatorEnv, namespace: str
) -> None:
    kube = op.kube
    # 60 characters: the API server cuts generateName to 58, so pod names do not start with
    # the pool's name plus a dash (an operator that matched its pods' memory by name saw none).
    name = "memory-" + "m" * 53
    pool = agent_pool(
        name,
        warm={"min": 1},
        scaling=fast_scaling(),
        memory={"mode": "Auto", "targetUtilization": 0.5, "min": "64Mi", "max": "512Mi", "window": "40s"},
    )
    pool["spec"]["template"]["spec"]["containers"][0]["resources"] = {"limits": {"memory": "256Mi"}}
    kube.apply(pool, namespace=namespace)
    (agent,) = wait_ready_agents(kube, namespace, name, 1, 90)
    assert agent_limits(kube, namespace, name) == {"256Mi"}, "before any samples, the template's limit"
    assert agent_status(kube, agent)["memoryLimitBytes"] == 256 * 2**20
    # The agent uses ~25 MiB: at a 50 % target that asks for ~50 MiB, bounded below by memory.min.
    wait_status(kube, namespace, name, "memoryLimit", "64Mi", 90)
    eventually(lambda: agent_limits(kube, namespace, name) == {"64Mi"}, 60, "the agent resized to 64Mi")
    (resized,) = ready_active(kube, namespace, name)
    assert resized["metadata"]["uid"] == agent["metadata"]["uid"], "resized in place, not replaced"
    # The kubelet applied it: the container's own cgroup says so.
    eventually(
        lambda: agent_status(kube, agent)["memoryLimitBytes"] == 64 * 2**20, 60, "the kernel to enforce 64Mi"
    )
    lowered = [e for e in events(kube, namespace, name) if e["reason"].startswith("MemoryLimit")]
    assert lowered and "p95=" in lowered[0]["message"], lowered

    with contextlib.suppress(AssertionError):  # the agent may die before it answers
        kube.pod_post(namespace, agent["metadata"]["name"], contract.HTTP_PORT, "/test/alloc?mb=80")

    def oom_killed() -> bool:
        status = kube.get("pod", agent["metadata"]["name"], namespace)["status"]
        return any(
            s.get("lastState", {}).get("terminated", {}).get("reason") == "OOMKilled"
            for s in status.get("containerStatuses", [])
        )

    eventually(oom_killed, 60, "the agent to be OOMKilled at 64Mi")
    # At least 1.5 x the limit it died at (samples taken just before the kill may ask for more),
    # applied once and to the same pod.
    eventually(
        lambda: agent_status(kube, agent)["memoryLimitBytes"] >= 96 * 2**20,
        90,
        "the same pod resized to >= 96Mi",
    )
    bumped_to = parse_quantity(pool_status(kube, namespace, name)["memoryLimit"])
    assert 96 * 2**20 <= bumped_to < 512 * 2**20, "one bump, not a run-away to memory.max"
    bumped = [e for e in events(kube, namespace, name) if "oomKilled=" in e["message"]]
    assert bumped and bumped[0]["type"] == "Warning"


def test_a_pool_gets_a_secret_and_network_policy_and_its_agents_refuse_calls_without_its_token(
    op: OperatorEnv, namespace: str
) -> None:
    kube = op.kube
    kube.apply(agent_pool("guarded", warm={"min": 1}), namespace=namespace)
    (agent,) = wait_ready_agents(kube, namespace, "guarded", 1, 90)
    ref = pool_ref(kube, namespace, "guarded")
    owner = {"apiVersion": "tars.dev/v1alpha1", "kind": "AgentPool", "name": "guarded", "uid": ref.uid}
    secret = kube.get("secret", builders.pool_secret_name(ref), namespace)
    assert secret["metadata"]["ownerReferences"] == [
        {**owner, "controller": True, "blockOwnerDeletion": True}
    ]
    # The pool uses the chart's Redis: its agents get that Redis's password from this Secret.
    assert sorted(secret["data"]) == [builders.SECRET_AGENT_TOKEN, builders.SECRET_REDIS_PASSWORD]
    assert kube.secret_value(namespace, secret["metadata"]["name"], "redis-password") == op.redis_password()
    policy = kube.get("networkpolicy", builders.network_policy_name(ref), namespace)
    assert policy["spec"]["podSelector"] == {"matchLabels": {contract.POOL_LABEL: "guarded"}}
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": contract.HTTP_PORT}]

    name = agent["metadata"]["name"]
    for token in (None, "guessed-token"):
        refused = kube.pod_request(namespace, name, contract.HTTP_PORT, "POST", contract.PATH_DRAIN, token)
        assert refused.status_code == 401, refused.text
    token = pool_token(kube, namespace, "guarded")
    status = kube.pod_request(namespace, name, contract.HTTP_PORT, "GET", contract.PATH_STATUS, token)
    assert status.status_code == 200 and status.json()["draining"] is False
    # Probes need no token: the agent is still Ready.
    assert [p["metadata"]["name"] for p in ready_active(kube, namespace, "guarded")] == [name]

    # The Secret, the NetworkPolicy and the pool's Redis keys go with the pool, even a waiting
    # task (which no TTL drops); another pool's keys stay.
    waiting = f"{contract.pool_key_prefix(namespace, 'guarded')}:q:high"
    other = f"{contract.pool_key_prefix(namespace, 'guarded-2')}:q:high"
    with op.redis() as r:
        for stream in (waiting, other):
            r.xadd(stream, {"task": "never taken"})
    kube.run("delete", "agentpool", "guarded", "-n", namespace)
    eventually(
        lambda: (
            not kube.exists("secret", builders.pool_secret_name(ref), namespace)
            and not kube.exists("networkpolicy", builders.network_policy_name(ref), namespace)
        ),
        90,
        "the pool's Secret and NetworkPolicy garbage-collected",
    )
    with op.redis() as r:
        eventually(lambda: not r.exists(waiting), 30, "the deleted pool's Redis keys removed")
        assert r.exists(other)
        r.delete(other)
