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
from pathlib import Path

import redis.asyncio as aioredis

from tars_agent.client import TaskClient
from tars_agent.tasks import PRIORITIES
from tars_localcluster.cluster import Cluster, log
from tars_localcluster.config import LOCALCLUSTER_DIR, ClusterConfig
from tars_localcluster.procs import ClusterError, exit_code, run, wait_for

REPO = Path(__file__).resolve().parents[2]
POOL, NAMESPACE = "demo", "tars-demo"
RELEASE, RELEASE_NAMESPACE = "tars-operator", "tars-system"


def pool_line(cluster: Cluster) -> str:
    return cluster.run_kubectl("get", "agentpool", POOL, "-n", NAMESPACE, "--no-headers").strip()


def install(cluster: Cluster) -> None:
    """The operator by `helm upgrade --install`; it watches only the demo's namespace, so the
    e2e suite's own pools on the same cluster are not its business."""
    cluster.run_kubectl(
        "apply",
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
    )
    started = time.monotonic()
    proc = run(
        [
            str(cluster.cfg.bin_dir / "helm"),
            f"--kubeconfig={cluster.cfg.admin_kubeconfig}",
            "upgrade",
            "--install",
            RELEASE,
            str(REPO / "helm" / "tars-operator"),
            "--namespace",
            RELEASE_NAMESPACE,
            "--create-namespace",
            "-f",
            str(LOCALCLUSTER_DIR / "helm-values.yaml"),
            "--set-json",
            f'watchNamespaces=["{NAMESPACE}"]',
            "--wait",
            "--timeout=5m",
        ],
        check=False,
        timeout=330,
    )
    if proc.returncode != 0:
        raise ClusterError(f"helm install of the operator failed: {proc.stderr.strip()}")
    took = time.monotonic() - started
    log(f"operator installed by helm (release {RELEASE_NAMESPACE}/{RELEASE}, {took:.0f}s)")


def redis_password(cluster: Cluster) -> str:
    """The password the chart generated for its Redis (kept across `helm upgrade`)."""
    secret = json.loads(
        cluster.run_kubectl("get", "secret", f"{RELEASE}-redis", "-n", RELEASE_NAMESPACE, "-o", "json")
    )
    return base64.b64decode(secret["data"]["redis-password"]).decode()


async def run_tasks(
    cluster: Cluster, redis_port: int, count: int
) -> tuple[list[tuple[str, str]], dict[str, float], Counter[str]]:
    redis = aioredis.from_url(f"redis://127.0.0.1:{redis_port}/0", password=redis_password(cluster))
    client = TaskClient(redis, NAMESPACE, POOL)
    started = time.monotonic()
    submitted: list[tuple[str, str]] = []
    for i in range(count):
        priority = PRIORITIES[i % len(PRIORITIES)]
        prompt = f"Summarise finding #{i} for the {priority} queue."
        task = await client.submit_payload(
            {"messages": [{"role": "user", "content": prompt}], "max_tokens": 32},
            priority=priority,
            idempotency_key=f"demo-{int(started)}-{i}",
        )
        submitted.append((task.task_id, priority))
    log(f"submitted {count} tasks ({', '.join(PRIORITIES)}); agents scale on the queue")
    finished: dict[str, float] = {}
    outcomes: Counter[str] = Counter()
    deadline = started + 600
    while len(finished) < count and time.monotonic() < deadline:
        for task_id, _ in submitted:
            if task_id in finished:
                continue
            result = await client.result(task_id)
            if result is not None and result.status in ("done", "dead"):
                finished[task_id] = time.monotonic() - started
                outcomes[result.status] += 1
        log(f"{len(finished):>4}/{count} done | {pool_line(cluster)}")
        await asyncio.sleep(2)
    await redis.aclose()
    return submitted, finished, outcomes


def report(
    cluster: Cluster, submitted: list[tuple[str, str]], finished: dict[str, float], outcomes: Counter[str]
) -> None:
    by_priority: dict[str, list[float]] = {p: [] for p in PRIORITIES}
    for task_id, priority in submitted:
        if task_id in finished:
            by_priority[priority].append(finished[task_id])
    upstream = json.loads(
        cluster.run_kubectl(
            "get", "--raw", f"/api/v1/namespaces/{NAMESPACE}/services/mock-llm:8000/proxy/admin/log"
        )
    )
    print()
    print(f"{'priority':<10}{'done':>6}{'mean s':>9}{'last s':>9}")
    for priority, times in by_priority.items():
        if times:
            print(f"{priority:<10}{len(times):>6}{sum(times) / len(times):>9.1f}{max(times):>9.1f}")
    print()
    unfinished = len(submitted) - len(finished)
    print(f"tasks done: {outcomes['done']}, dead-lettered: {outcomes['dead']}, unfinished: {unfinished}")
    print(
        f"upstream requests admitted: {len(upstream['admitted'])}, refused with 429: {upstream['rejected']}"
    )
    if unfinished:
        raise ClusterError(
            f"{unfinished} tasks did not finish in time; see `kubectl get ap,pods -n {NAMESPACE}`"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tars-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=120)
    args = parser.parse_args(argv)
    cluster = Cluster(ClusterConfig.default())
    return exit_code("demo", lambda: run_demo(cluster, args.tasks))


def run_demo(cluster: Cluster, tasks: int) -> None:
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
    with cluster.kubectl.port_forward(RELEASE_NAMESPACE, f"svc/{RELEASE}-redis", 6379) as redis_port:
        report(cluster, *asyncio.run(run_tasks(cluster, redis_port, tasks)))
    print()
    print("The cluster keeps running. Look around:")
    print(f'  eval "$(make -s cluster-env)"; kubectl get agentpools,pods -n {NAMESPACE}')
    print(f"  kubectl describe agentpool -n {NAMESPACE} {POOL}")
    print(f"  kubectl logs -n {RELEASE_NAMESPACE} deploy/{RELEASE}")
    print("  make cluster-down             # stop everything")


if __name__ == "__main__":
    sys.exit(main())
