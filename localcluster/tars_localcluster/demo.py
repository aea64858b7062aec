"""`make demo`: the system's main job, end to end, on the local cluster.

Brings the cluster up (building it the first time), installs the AgentPool
CRD, starts the operator, applies examples/demo-pool.yaml (real tars-agent
processes calling the cluster's rate-limited mock LLM), submits a burst of
tasks of every priority, and reports as they complete: queue, agents, results,
and how many requests the upstream had to refuse (the limiter's job: none).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from tars_agent.client import PRIORITY_NAMES, TaskClient
from tars_localcluster.cluster import Cluster, log
from tars_localcluster.config import ClusterConfig
from tars_localcluster.procs import ClusterError, wait_for

REPO = Path(__file__).resolve().parents[2]
POOL, NAMESPACE = "demo", "default"


def kubectl(cluster: Cluster, *args: str) -> str:
    proc = subprocess.run(
        [cluster.kubectl(), "--kubeconfig", str(cluster.cfg.admin_kubeconfig), *args],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise ClusterError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def pool_line(cluster: Cluster) -> str:
    return kubectl(cluster, "get", "agentpool", POOL, "-n", NAMESPACE, "--no-headers").strip()


async def run_tasks(
    cluster: Cluster, count: int
) -> tuple[list[tuple[str, str]], dict[str, float], Counter[str]]:
    redis = aioredis.from_url(cluster.cfg.redis_url)
    client = TaskClient(redis, NAMESPACE, POOL)
    started = time.monotonic()
    submitted = []
    for i in range(count):
        priority = PRIORITY_NAMES[i % len(PRIORITY_NAMES)]
        prompt = f"Summarise finding #{i} for the {priority} queue."
        task = await client.submit_payload(
            {"messages": [{"role": "user", "content": prompt}], "max_tokens": 32},
            priority=priority,
            idempotency_key=f"demo-{int(started)}-{i}",
        )
        submitted.append((task.task_id, priority))
    log(f"submitted {count} tasks ({', '.join(PRIORITY_NAMES)}); agents scale on the queue")
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
    by_priority: dict[str, list[float]] = {p: [] for p in PRIORITY_NAMES}
    for task_id, priority in submitted:
        if task_id in finished:
            by_priority[priority].append(finished[task_id])
    url = f"http://{cluster.cfg.gateway_ip}:{cluster.cfg.mock_llm_port}/admin/log"
    upstream = httpx.get(url, timeout=5).json()
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
        raise ClusterError(f"{unfinished} tasks did not finish in time; see `kubectl get ap,pods`")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tars-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=120)
    args = parser.parse_args(argv)
    cluster = Cluster(ClusterConfig.default())
    try:
        cluster.up(build=True)
        kubectl(cluster, "apply", "-f", str(REPO / "crds"))
        kubectl(cluster, "wait", "--for=condition=Established", "crd/agentpools.tars.dev", "--timeout=60s")
        cluster.start_operator()
        kubectl(cluster, "apply", "-n", NAMESPACE, "-f", str(REPO / "examples" / "demo-pool.yaml"))
        took = wait_for(
            "the demo pool's warm agents",
            lambda: pool_line(cluster).split()[2:4] == ["2", "2"],  # READY and WARM columns
            120,
            cluster.daemons["operator"],
        )
        log(f"pool {POOL} has 2 warm agents ({took:.0f}s): {pool_line(cluster)}")
        report(cluster, *asyncio.run(run_tasks(cluster, args.tasks)))
    except ClusterError as exc:
        print(f"[demo] ERROR: {exc}", file=sys.stderr)
        return 1
    print()
    print("The cluster keeps running. Look around:")
    print('  eval "$(make -s cluster-env)"; kubectl get agentpools,pods; kubectl describe agentpool demo')
    print(f"  tars --pool {POOL} queue      # queue statistics")
    print("  make cluster-down             # stop everything")
    return 0


if __name__ == "__main__":
    sys.exit(main())
