"""`make demo`: the system's main job, end to end, on the local cluster.

Brings the cluster up (building it and the images the first time), installs the
operator with `helm install` (in-cluster, under the chart's RBAC, with the chart's
Redis and monitors), starts the mock LLM API (examples/mock-llm.yaml) and the pool
of examples/demo-pool.yaml (real tars-agent containers), submits a burst of tasks
of every priority and reports as they complete: queue, agents, results, and how
many requests the upstream had to refuse (the limiter's job: none).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis

from tars_agent.client import TaskClient
from tars_agent.tasks import PRIORITIES
from tars_localcluster.cluster import Cluster, log
from tars_localcluster.config import LOCALCLUSTER_DIR, ClusterConfig
from tars_localcluster.procs import ClusterError, exit_code, run, wait_for
from tars_localcluster.timeline import HEADER, FaultOutcome, Mark, Sample, plot, row

REPO = Path(__file__).resolve().parents[2]
POOL, NAMESPACE = "demo", "tars-demo"
RELEASE, RELEASE_NAMESPACE = "tars-operator", "tars-system"
RESULT_READS_AT_ONCE = 16  # Redis connections the live view may hold at once
MOCK_LLM_PROXY = f"/api/v1/namespaces/{NAMESPACE}/services/mock-llm:8000/proxy"


def pool_line(cluster: Cluster) -> str:
    return cluster.run_kubectl("get", "agentpool", POOL, "-n", NAMESPACE, "--no-headers").strip()


def helm_upgrade_install(
    cfg: ClusterConfig, release: str, release_namespace: str, watch_namespace: str
) -> None:
    """The chart by `helm upgrade --install` with the local cluster's values, its operator watching
    only `watch_namespace` (so the e2e suite's own pools on the same cluster are not its business)."""
    proc = run(
        [
            str(cfg.bin_dir / "helm"),
            f"--kubeconfig={cfg.admin_kubeconfig}",
            "upgrade",
            "--install",
            release,
            str(REPO / "helm" / "tars-operator"),
            "--namespace",
            release_namespace,
            "--create-namespace",
            "-f",
            str(LOCALCLUSTER_DIR / "helm-values.yaml"),
            "--set-json",
            f'watchNamespaces=["{watch_namespace}"]',
            "--wait",
            "--timeout=5m",
        ],
        check=False,
        timeout=330,
    )
    if proc.returncode != 0:
        raise ClusterError(f"helm install of the operator failed: {proc.stderr.strip()}")


def install(cluster: Cluster) -> None:
    """The demo's namespace, and the operator watching it."""
    cluster.run_kubectl(
        "apply",
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
    )
    started = time.monotonic()
    helm_upgrade_install(cluster.cfg, RELEASE, RELEASE_NAMESPACE, NAMESPACE)
    took = time.monotonic() - started
    log(f"operator installed by helm (release {RELEASE_NAMESPACE}/{RELEASE}, {took:.0f}s)")


def redis_password(cluster: Cluster) -> str:
    """The password the chart generated for its Redis (kept across `helm upgrade`)."""
    secret = json.loads(
        cluster.run_kubectl("get", "secret", f"{RELEASE}-redis", "-n", RELEASE_NAMESPACE, "-o", "json")
    )
    return base64.b64decode(secret["data"]["redis-password"]).decode()


@dataclass
class DemoRun:
    submitted: list[tuple[str, str]]  # (task id, priority) in submission order
    finished: dict[str, float] = field(default_factory=dict)  # task id -> seconds after submission
    outcomes: Counter[str] = field(default_factory=Counter)  # "done" / "dead"
    samples: list[Sample] = field(default_factory=list)
    fault: FaultOutcome | None = None


def observe_pool(cluster: Cluster) -> tuple[int, int, int]:
    """(desired, ready, busy) from the AgentPool's status."""
    status = json.loads(cluster.run_kubectl("get", "agentpool", POOL, "-n", NAMESPACE, "-o", "json")).get(
        "status", {}
    )
    return status.get("desiredReplicas", 0), status.get("ready", 0), status.get("busy", 0)


def observe_upstream(cluster: Cluster) -> tuple[int, int]:
    """(admitted, refused with 429) so far, from the mock LLM's log."""
    log_ = json.loads(cluster.run_kubectl("get", "--raw", f"{MOCK_LLM_PROXY}/admin/log"))
    return len(log_["admitted"]), int(log_["rejected"])


def kill_agent(cluster: Cluster, pod: str) -> None:
    """Crash an agent as a node failure would: SIGKILL its container (no drain, no goodbye),
    then delete its pod so it cannot come back under the same name."""
    status = json.loads(cluster.run_kubectl("get", "pod", pod, "-n", NAMESPACE, "-o", "json"))["status"]
    container_id = status["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    run([*cluster.ctr(), "task", "kill", "--signal", "SIGKILL", container_id])
    cluster.run_kubectl("delete", "pod", pod, "-n", NAMESPACE, "--grace-period=0", "--force", "--wait=false")


def busiest_agent(running: dict[str, str]) -> str | None:
    """The agent holding the most running tasks (task id -> worker)."""
    held = Counter(running.values())
    return max(sorted(held), key=held.__getitem__) if held else None


async def run_tasks(cluster: Cluster, redis_port: int, count: int, *, fault_at_s: float | None) -> DemoRun:
    redis = aioredis.from_url(f"redis://127.0.0.1:{redis_port}/0", password=redis_password(cluster))
    client = TaskClient(redis, NAMESPACE, POOL)
    started = time.monotonic()
    demo = DemoRun(submitted=[])
    for i in range(count):
        priority = PRIORITIES[i % len(PRIORITIES)]
        prompt = f"Summarise finding #{i} for the {priority} queue."
        task = await client.submit_payload(
            {"messages": [{"role": "user", "content": prompt}], "max_tokens": 32},
            priority=priority,
            idempotency_key=f"demo-{int(started)}-{i}",
        )
        demo.submitted.append((task.task_id, priority))
    log(f"submitted {count} tasks ({', '.join(PRIORITIES)}); agents scale on the queue")
    done: Counter[str] = Counter()
    held_by_victim: list[str] = []
    print(HEADER)
    deadline = started + 600
    while len(demo.finished) < count and time.monotonic() < deadline:
        pending = [(t, p) for t, p in demo.submitted if t not in demo.finished]
        results = [
            r
            for i in range(0, len(pending), RESULT_READS_AT_ONCE)
            for r in await asyncio.gather(
                *(client.result(t) for t, _ in pending[i : i + RESULT_READS_AT_ONCE])
            )
        ]
        running: dict[str, str] = {}
        for (task_id, task_priority), result in zip(pending, results, strict=True):
            if result is not None and result.status in ("done", "dead"):
                demo.finished[task_id] = time.monotonic() - started
                demo.outcomes[result.status] += 1
                done[task_priority] += 1
            elif result is not None and result.status == "running" and result.worker:
                running[task_id] = result.worker
        desired, ready, busy = await asyncio.to_thread(observe_pool, cluster)
        upstream_ok, upstream_429 = await asyncio.to_thread(observe_upstream, cluster)
        sample = Sample(
            time.monotonic() - started,
            await client.waiting(),
            dict(done),
            desired,
            ready,
            busy,
            upstream_ok,
            upstream_429,
        )
        demo.samples.append(sample)
        print(row(sample), flush=True)
        if fault_at_s is not None and demo.fault is None and sample.t >= fault_at_s and ready >= 2:
            victim = busiest_agent(running)
            if victim is not None:
                await asyncio.to_thread(kill_agent, cluster, victim)
                demo.fault = FaultOutcome(victim, time.monotonic() - started)
                # What it held when it died: a dead agent changes nothing any more.
                held_by_victim = [
                    task_id
                    for task_id, _ in pending
                    if (r := await client.result(task_id)) is not None
                    and r.status == "running"
                    and r.worker == victim
                ]
                log(f"killed agent {victim} (SIGKILL) holding {len(held_by_victim)} running task(s)")
        await asyncio.sleep(1)  # the live view's cadence
    if demo.fault is not None:
        finished_by: dict[str, str | None] = {}
        for task_id in held_by_victim:
            result = await client.result(task_id)
            finished_by[task_id] = result.worker if result is not None and result.status == "done" else None
        demo.fault = FaultOutcome(demo.fault.victim, demo.fault.t, finished_by)
    await redis.aclose()
    return demo


def report(cluster: Cluster, demo: DemoRun, timeline: Path) -> None:
    by_priority: dict[str, list[float]] = {p: [] for p in PRIORITIES}
    for task_id, priority in demo.submitted:
        if task_id in demo.finished:
            by_priority[priority].append(demo.finished[task_id])
    upstream_ok, upstream_429 = observe_upstream(cluster)
    print()
    print(f"{'priority':<10}{'done':>6}{'mean s':>9}{'last s':>9}")
    for priority, times in by_priority.items():
        if times:
            print(f"{priority:<10}{len(times):>6}{sum(times) / len(times):>9.1f}{max(times):>9.1f}")
    print()
    unfinished = len(demo.submitted) - len(demo.finished)
    print(
        f"tasks done: {demo.outcomes['done']}, dead-lettered: {demo.outcomes['dead']}, "
        f"unfinished: {unfinished}"
    )
    print(f"upstream requests admitted: {upstream_ok}, refused with 429: {upstream_429}")
    marks = []
    if demo.fault is not None:
        print(demo.fault.describe())
        marks.append(Mark(demo.fault.t, f"agent {demo.fault.victim} killed"))
    plot(demo.samples, marks, timeline)
    print(f"timeline: {timeline}")
    if unfinished:
        raise ClusterError(
            f"{unfinished} tasks did not finish in time; see `kubectl get ap,pods -n {NAMESPACE}`"
        )
    if demo.fault is not None and not demo.fault.recovered:
        raise ClusterError(f"tasks of the killed agent were not finished: {demo.fault.describe()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tars-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=120)
    parser.add_argument(
        "--kill-agent-at",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="kill a busy agent this long after the burst (its tasks must be finished by others); "
        "a negative value: no fault",
    )
    parser.add_argument(
        "--timeline", type=Path, default=REPO / "bench" / "out" / "demo-timeline.png", help="the PNG to write"
    )
    args = parser.parse_args(argv)
    cluster = Cluster(ClusterConfig.default())
    fault_at = args.kill_agent_at if args.kill_agent_at >= 0 else None
    return exit_code("demo", lambda: run_demo(cluster, args.tasks, fault_at, args.timeline))


def run_demo(cluster: Cluster, tasks: int, fault_at_s: float | None, timeline: Path) -> None:
    cluster.up(build=True)
    install(cluster)
    cluster.run_kubectl("apply", "-n", NAMESPACE, "-f", str(REPO / "examples" / "mock-llm.yaml"))
    cluster.run_kubectl("rollout", "status", "deployment/mock-llm", "-n", NAMESPACE, "--timeout=120s")
    cluster.run_kubectl("apply", "-n", NAMESPACE, "-f", str(REPO / "examples" / "demo-pool.yaml"))
    took = wait_for(
        "the demo pool's warm agents",
        lambda: pool_line(cluster).split()[2:4] == ["2", "2"],  # READY and WARM columns
        180,
    )
    log(f"pool {NAMESPACE}/{POOL} has 2 warm agents ({took:.0f}s): {pool_line(cluster)}")
    # The upstream's counts are this run's (the mock keeps running between demos).
    cluster.run_kubectl("create", "--raw", f"{MOCK_LLM_PROXY}/admin/reset", "-f", "-", stdin="{}")
    with cluster.kubectl.port_forward(RELEASE_NAMESPACE, f"svc/{RELEASE}-redis", 6379) as redis_port:
        demo = asyncio.run(run_tasks(cluster, redis_port, tasks, fault_at_s=fault_at_s))
        report(cluster, demo, timeline)
    print()
    print("The cluster keeps running. Look around:")
    print(f'  eval "$(make -s cluster-env)"; kubectl get agentpools,pods -n {NAMESPACE}')
    print(f"  kubectl describe agentpool -n {NAMESPACE} {POOL}")
    print(f"  kubectl logs -n {RELEASE_NAMESPACE} deploy/{RELEASE}")
    print("  make cluster-down             # stop everything")


if __name__ == "__main__":
    sys.exit(main())
