"""Cold vs warm agents on a real node: pod create -> agent Ready -> first task, against a task
picked up by an agent that is already running, side by side in one run.

The claim under test (the bottleneck analysis): a cold agent takes 2-3 s before it can work, a
warm one picks work up in 150-300 ms; the operator's warm floor exists to turn the first into
the second. Agents are the pods the operator itself would create (tars_operator.builders.render,
from the agent image), created directly so that only the runtime path is measured: scheduler,
kubelet, containerd, the agent's start-up, its first pull from the queue.

Needs a cluster (default: the local one, `make cluster-up`; or --kubeconfig) that holds the
agent image and a Redis image. Everything goes through the API server (`kubectl proxy` and a
port-forward to Redis), so any cluster works.

    make bench-coldwarm                     # ~2 min on the local cluster
    python bench/coldwarm.py --rounds 20    # more rounds, tighter percentiles
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
import yaml

from tars_agent.client import TaskClient
from tars_contract import contract
from tars_localcluster.kubectl import Kubectl
from tars_operator import models
from tars_operator.builders import OperatorDefaults, PoolRef, render

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out"
TASK = {"messages": [{"role": "user", "content": "ping"}], "max_tokens": 4}


@dataclass
class Config:
    kubectl: Kubectl
    agent_image: str
    redis_image: str
    rounds: int
    warm_agents: int
    out: Path


@dataclass
class Results:
    cold_ready: list[float] = field(default_factory=list)  # pod create -> Ready
    cold_first_task: list[float] = field(default_factory=list)  # pod create -> first task started
    warm_pickup: list[float] = field(default_factory=list)  # task submit -> started by a warm agent


def agent_pod(cfg: Config, namespace: str, pool: str, redis_url: str, llm_url: str) -> dict[str, Any]:
    """The pod the operator would create for `pool`, without what needs an AgentPool (its owner
    reference, the token from its Secret)."""
    spec = models.AgentPoolSpec.model_validate(
        {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "agent",
                            "image": cfg.agent_image,
                            "imagePullPolicy": "IfNotPresent",
                            "env": [
                                {"name": contract.ENV_LLM_BASE_URL, "value": llm_url},
                                {"name": contract.ENV_CONCURRENCY, "value": "1"},
                            ],
                        }
                    ]
                }
            },
            "rotation": {"drainTimeout": "5s"},
        }
    )
    pod = render(PoolRef(pool, namespace, uid=""), spec, None, OperatorDefaults(redis_url=redis_url))
    del pod["metadata"]["ownerReferences"]
    # No pool, so no pool Secret: the bench never calls /status or /drain, which need the token.
    agent = pod["spec"]["containers"][0]
    agent["env"] = [e for e in agent["env"] if e["name"] != contract.ENV_AGENT_TOKEN]
    return pod


class PodWatch:
    """When each pod of the namespace was first seen Ready (host clock), from one watch stream."""

    def __init__(self, api: str, namespace: str) -> None:
        self.ready_at: dict[str, float] = {}
        self._changed = threading.Condition()
        self._url = f"{api}/api/v1/namespaces/{namespace}/pods"
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True

    def _run(self) -> None:
        while not self._stop:
            try:
                with httpx.stream("GET", self._url, params={"watch": "1"}, timeout=None) as resp:
                    for line in resp.iter_lines():
                        if self._stop:
                            return
                        self._event(json.loads(line)["object"], time.time())
            except httpx.HTTPError:
                time.sleep(0.2)

    def _event(self, pod: dict[str, Any], now: float) -> None:
        conditions = pod.get("status", {}).get("conditions", [])
        if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            with self._changed:
                self.ready_at.setdefault(pod["metadata"]["name"], now)
                self._changed.notify_all()

    def wait_ready(self, name: str, timeout: float = 120) -> float:
        with self._changed:
            if not self._changed.wait_for(lambda: name in self.ready_at, timeout):
                raise SystemExit(f"pod {name} was not Ready within {timeout:.0f} s")
            return self.ready_at[name]


async def started_at(client: TaskClient, task_id: str) -> float:
    """The Redis clock (s) at which an agent began the task: the id of its "start" event."""
    key = client.keys.chunks(task_id)
    async with asyncio.timeout(120):
        while True:
            for entry_id, fields in await client.redis.xrange(key) or []:
                if fields and fields.get(b"event") == b"start" and isinstance(entry_id, bytes):
                    return int(entry_id.decode().split("-")[0]) / 1000
            await asyncio.sleep(0.005)


async def submitted_at(client: TaskClient, task_id: str) -> float:
    """The Redis clock (s) at submission, as the submit script recorded it."""
    return float(await client.redis.hget(client.keys.task(task_id), "submitted_at") or 0)


def create_pod(api: str, namespace: str, pod: dict[str, Any]) -> tuple[str, float]:
    created = time.time()
    resp = httpx.post(f"{api}/api/v1/namespaces/{namespace}/pods", json=pod, timeout=30)
    if resp.status_code != 201:
        raise SystemExit(f"creating the agent pod failed ({resp.status_code}): {resp.text[:500]}")
    return str(resp.json()["metadata"]["name"]), created


def delete_pod(api: str, namespace: str, name: str) -> None:
    httpx.delete(f"{api}/api/v1/namespaces/{namespace}/pods/{name}", params={"gracePeriodSeconds": "1"})


async def measure(
    cfg: Config, api: str, namespace: str, redis_address: tuple[str, int], results: Results
) -> None:
    redis = aioredis.Redis(host=redis_address[0], port=redis_address[1])
    redis_url = f"redis://redis.{namespace}.svc:6379/0"
    llm_url = f"http://mock-llm.{namespace}.svc:8000/v1"
    watch = PodWatch(api, namespace)
    watch.start()
    warm = TaskClient(redis, namespace, "warm")
    for _ in range(cfg.warm_agents):
        name, _ = create_pod(api, namespace, agent_pod(cfg, namespace, "warm", redis_url, llm_url))
        await asyncio.to_thread(watch.wait_ready, name)
    # One task through each warm agent first: the first pull of an agent is not "warm".
    for _ in range(cfg.warm_agents):
        first = await warm.submit_payload(TASK)
        await warm.wait(first.task_id, 60)
    for round_ in range(cfg.rounds):
        # Cold: a pool with no agent; its task waits until the new pod's agent takes it.
        pool = f"cold-{round_}"
        cold = TaskClient(redis, namespace, pool)
        task = await cold.submit_payload(TASK)
        name, created = create_pod(api, namespace, agent_pod(cfg, namespace, pool, redis_url, llm_url))
        ready = await asyncio.to_thread(watch.wait_ready, name)
        results.cold_ready.append(ready - created)
        results.cold_first_task.append(await started_at(cold, task.task_id) - created)
        delete_pod(api, namespace, name)
        # Warm: an idle agent that has been pulling all along.
        task = await warm.submit_payload(TASK)
        start = await started_at(warm, task.task_id)
        results.warm_pickup.append(start - await submitted_at(warm, task.task_id))
        await warm.wait(task.task_id, 60)
        cold_ready, cold_first = results.cold_ready[-1], results.cold_first_task[-1]
        print(
            f"round {round_ + 1:>2}/{cfg.rounds}: cold ready {cold_ready:.2f} s, first task "
            f"{cold_first:.2f} s; warm pickup {results.warm_pickup[-1] * 1000:.0f} ms",
            flush=True,
        )
    watch.stop()
    await redis.aclose()


def infrastructure(cfg: Config) -> list[dict[str, Any]]:
    """Redis and the mock LLM upstream (examples/mock-llm.yaml, no rate limit) in the bench's namespace."""
    restricted = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": 999,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    redis_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "redis", "labels": {"app": "redis"}},
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "redis",
                    "image": cfg.redis_image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["redis-server", "--protected-mode", "no", "--save", "", "--dir", "/data"],
                    "ports": [{"containerPort": 6379}],
                    "readinessProbe": {"tcpSocket": {"port": 6379}, "periodSeconds": 1},
                    "securityContext": restricted,
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }
    redis_service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "redis"},
        "spec": {"selector": {"app": "redis"}, "ports": [{"port": 6379}]},
    }
    upstream = list(yaml.safe_load_all((REPO / "examples" / "mock-llm.yaml").read_text()))
    container = upstream[0]["spec"]["template"]["spec"]["containers"][0]
    container["image"] = cfg.agent_image
    container["args"] = ["--host=0.0.0.0", "--port=8000", "--latency=0.05", "--response-tokens=4"]
    return [redis_pod, redis_service, *upstream]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def table(results: Results) -> str:
    rows = [
        ("cold: pod create -> agent Ready", results.cold_ready),
        ("cold: pod create -> first task started", results.cold_first_task),
        ("warm: task submit -> started", results.warm_pickup),
    ]
    lines = [f"{'path':<42}{'n':>4}{'p50':>10}{'p90':>10}{'max':>10}{'mean':>10}"]
    for label, values in rows:
        cells = [percentile(values, 0.5), percentile(values, 0.9), max(values), statistics.fmean(values)]
        lines.append(f"{label:<42}{len(values):>4}" + "".join(f"{v * 1000:>8.0f}ms" for v in cells))
    ratio = percentile(results.cold_first_task, 0.5) / percentile(results.warm_pickup, 0.5)
    lines.append("")
    lines.append(f"a task waits {ratio:.0f}x longer (p50) for a cold agent than for a warm one")
    return "\n".join(lines)


def plot(path: Path, results: Results, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    data = [results.cold_ready, results.cold_first_task, results.warm_pickup]
    labels = ["cold: create -> Ready", "cold: create -> first task", "warm: submit -> start"]
    ax.boxplot([[v * 1000 for v in d] for d in data], orientation="horizontal", showfliers=True)
    ax.set_yticks(range(1, len(labels) + 1), labels)
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds (log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), platform.processor()
    )
    return f"{os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}"


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", help="default: the local cluster's")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warm-agents", type=int, default=2)
    parser.add_argument("--agent-image", default="ghcr.io/tars-dev/tars-agent:0.1.0")
    parser.add_argument("--redis-image", default="localhost/tars/redis:7.0-bookworm")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    kubeconfig = args.kubeconfig
    if kubeconfig is None:
        from tars_localcluster.config import ClusterConfig

        kubeconfig = str(ClusterConfig.default().admin_kubeconfig)
    kubectl = Kubectl(str(Path(sys.executable).parent / "kubectl"), kubeconfig)
    return Config(kubectl, args.agent_image, args.redis_image, args.rounds, args.warm_agents, args.out)


def collect(cfg: Config, namespace: str) -> Results:
    """All rounds, in `namespace` (created here with Redis and the mock LLM, deleted afterwards)."""
    kubectl = cfg.kubectl
    kubectl.run("create", "namespace", namespace)
    try:
        kubectl.run("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(infrastructure(cfg)))
        kubectl.run("wait", "-n", namespace, "--for=condition=Ready", "pod/redis", "--timeout=120s")
        kubectl.run("rollout", "status", "-n", namespace, "deployment/mock-llm", "--timeout=120s")
        results = Results()
        with kubectl.proxy() as api, kubectl.service_address(namespace, "redis", 6379) as redis_address:
            asyncio.run(measure(cfg, api, namespace, redis_address, results))
    finally:
        kubectl.run("delete", "namespace", namespace, "--wait=false")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(argv)
    namespace = f"bench-coldwarm-{uuid.uuid4().hex[:6]}"
    command = "python bench/coldwarm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: {command.strip()}\nmachine: {machine()}\nnamespace: {namespace}", flush=True)
    results = collect(cfg, namespace)
    report = table(results)
    print()
    print(report)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "coldwarm.json").write_text(json.dumps(results.__dict__, indent=2))
    plot(cfg.out / "coldwarm.png", results, f"{command.strip()} | {machine()}")
    print(f"\nwrote {cfg.out / 'coldwarm.png'} and {cfg.out / 'coldwarm.json'}")


if __name__ == "__main__":
    main()
