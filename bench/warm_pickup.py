"""Warm pickup and refill on the real node, side by side with agent-sandbox's published figures.

The operator installed by the chart (`helm install`, in-cluster from its image, as e2e and the
demo install it), the mock LLM (examples/mock-llm.yaml, 0.2 s latency, no rate limit) and an
AgentPool of real agents from our image with a warm floor of 4 agents x 25 slots, all in a
namespace of the bench's own. Then, in one run:

(a) 45 tasks/s for `--seconds` (60): submit -> first attempt start per task, both on Redis' clock
    (the task hash's `submitted_at`, the id of its "start" event), p50/p99; cross-checked against
    the agents' own histogram (tars_task_pickup_seconds) through Prometheus;
(b) a 300-task burst on the settled pool with the operator scaling: p50/p99, and the new agents'
    Ready times (agents/s) from a pod watch;
(c) the cold path, pod create -> agent Ready -> first task, by bench/coldwarm.py's own rounds;
(d) throughout, every 0.5 s: the pool's live pods against status.desiredReplicas + surge
    (rotation.maxUnavailable): max(live - (desired + surge)) must stay <= 0;
(e) from the burst to its last task: the cores the machine and the local node's pods used.

    make bench-pickup VENV=...                  # ~6 min on the local cluster (it must be up)
    python bench/warm_pickup.py --seconds 20    # shorter sustained phase
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the e2e harness installs the chart as the e2e suite does

from e2e.harness import IMAGES, Kube, Prometheus, eventually, temporary_namespace  # noqa: E402
from e2e.operator_env import Helm, OperatorEnv, e2e_values, find_helm  # noqa: E402

import coldwarm  # noqa: E402
from pickup_stats import (  # noqa: E402
    CpuReading,
    PoolSample,
    comparison,
    cpu_share,
    is_live,
    max_excess,
    pickup_s,
    quantiles,
    refill,
)
from tars_agent.client import TaskClient  # noqa: E402
from tars_agent.tasks import PRIORITIES  # noqa: E402
from tars_contract import contract, metric_names  # noqa: E402
from tars_localcluster import cgroups  # noqa: E402
from tars_localcluster.config import ClusterConfig  # noqa: E402
from tars_localcluster.kubectl import Kubectl  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
POOL = "pickup"
WARM, SLOTS, SURGE = 4, 25, 1
AGENT_CPU = "100m"  # 12 agents at most: 1.2 of the node's 2 cores, beside the rest's requests
TASK = {"messages": [{"role": "user", "content": "ping"}], "max_tokens": 8}
PROMETHEUS = "monitoring/prometheus:9090"  # the local cluster's (as the e2e suite's default)


def pool_manifest(upstream: str) -> dict[str, Any]:
    agent = {
        "name": "agent",
        "image": IMAGES.agent,
        "imagePullPolicy": "IfNotPresent",
        "env": [
            {"name": contract.ENV_LLM_BASE_URL, "value": f"{upstream}/v1"},
            {"name": contract.ENV_CONCURRENCY, "value": str(SLOTS)},
        ],
        # A CPU request, as a pool in production states one: without, the agents are BestEffort
        # (cpu.shares 2 for all of them) and anything busy on the node starves their pickup.
        "resources": {"requests": {"cpu": AGENT_CPU}},
    }
    return {
        "apiVersion": "tars.dev/v1alpha1",
        "kind": "AgentPool",
        "metadata": {"name": POOL},
        "spec": {
            "template": {"spec": {"containers": [agent]}},
            "replicas": {"min": WARM, "max": 12},
            "warm": {"min": WARM},
            "scaling": {
                "interval": "2s",
                "queueDepth": {"threshold": 50, "targetPerAgent": SLOTS},
                "scaleDown": {"stabilizationWindow": "15s"},
            },
            "rotation": {"maxUnavailable": SURGE},
            # room for a backlog: on a busy machine the agents may fall behind 45/s
            "queue": {"maxDepth": 10_000},
        },
    }


def upstream(kube: Kube, namespace: str) -> str:
    manifests = list(yaml.safe_load_all((REPO / "examples" / "mock-llm.yaml").read_text()))
    container = manifests[0]["spec"]["template"]["spec"]["containers"][0]
    container["image"] = IMAGES.agent
    container["args"] = ["--host=0.0.0.0", "--port=8000", "--latency=0.2", "--response-tokens=8"]
    container["resources"]["requests"]["cpu"] = "200m"  # the stand-in upstream must not be what is slow
    kube.apply(*manifests, namespace=namespace)
    kube.run("rollout", "status", "deployment/mock-llm", "-n", namespace, "--timeout=120s")
    return f"http://mock-llm.{namespace}.svc:8000"


class PoolWatch(coldwarm.PodWatch):
    """coldwarm's watch (first Ready per pod), plus when each pod of the pool was first seen."""

    def __init__(self, api: str, namespace: str) -> None:
        super().__init__(api, namespace)
        self.seen_at: dict[str, float] = {}

    def _event(self, pod: dict[str, Any], now: float) -> None:
        if pod["metadata"].get("labels", {}).get(contract.POOL_LABEL) == POOL:
            self.seen_at.setdefault(pod["metadata"]["name"], now)
            super()._event(pod, now)


def read_cpu() -> CpuReading | None:
    """The machine's busy CPU seconds and the local node's pods' (their cgroup parent's usage);
    None where the pods are not on this machine (another cluster)."""
    parent = ClusterConfig.default().cgroup_parent
    pods_s = None
    for root in cgroups.hierarchies():
        if (usage := root / parent / "cpuacct.usage").exists():  # v1: ns
            pods_s = int(usage.read_text()) / 1e9
        elif (stat := root / parent / "cpu.stat").exists() and "usage_usec" in (text := stat.read_text()):
            pods_s = int(text.split("usage_usec")[1].split()[0]) / 1e6  # unified: us
    if pods_s is None:
        return None
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    return CpuReading(time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), pods_s)


class Sampler:
    """The pool's pods and status every 0.5 s, through the API server."""

    def __init__(self, api: str, namespace: str) -> None:
        self.samples: list[PoolSample] = []
        self._pods = f"{api}/api/v1/namespaces/{namespace}/pods"
        self._pool = f"{api}/apis/tars.dev/v1alpha1/namespaces/{namespace}/agentpools/{POOL}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as http:
            while not self._stop.is_set():
                now = time.time()
                try:
                    pods = http.get(self._pods, params={"labelSelector": f"{contract.POOL_LABEL}={POOL}"})
                    pool = http.get(self._pool).json()
                    items = pods.json()["items"]
                except (httpx.HTTPError, ValueError, KeyError):
                    self._stop.wait(0.5)
                    continue
                status = pool.get("status", {})
                self.samples.append(
                    PoolSample(
                        t=now,
                        pods=len(items),
                        live=sum(is_live(p) for p in items),
                        ready=sum(
                            is_live(p)
                            and any(
                                c["type"] == "Ready" and c["status"] == "True"
                                for c in p.get("status", {}).get("conditions", [])
                            )
                            for p in items
                        ),
                        desired=status.get("desiredReplicas"),
                        warm=status.get("warm"),
                        surge=int(pool["spec"].get("rotation", {}).get("maxUnavailable", 1)),
                        queue=status.get("queueDepth"),
                    )
                )
                self._stop.wait(max(0.5 - (time.time() - now), 0))


@dataclass
class Results:
    sustained_rate: float
    sustained_s: float
    sustained: list[float] = field(default_factory=list)  # submit -> start, s
    sustained_window: tuple[float, float] = (0.0, 0.0)  # host clock
    burst: list[float] = field(default_factory=list)
    burst_at: float = 0.0
    burst_refill: dict[str, float] = field(default_factory=dict)
    burst_cpu: dict[str, float] = field(default_factory=dict)  # cpu_share, the burst to its last task
    warm_floor_back_s: float | None = None
    prometheus: dict[str, float | None] = field(default_factory=dict)
    cold_ready: list[float] = field(default_factory=list)
    cold_first_task: list[float] = field(default_factory=list)
    samples: list[PoolSample] = field(default_factory=list)
    load_average: list[tuple[str, float]] = field(default_factory=list)  # the host's 1-min load per phase


async def pickups(client: TaskClient, task_ids: Sequence[str]) -> list[float]:
    """submit -> first attempt start per task, on Redis' clock, once all of them are done."""
    await all_done(client)
    return await read_pickups(client, task_ids)


async def all_done(client: TaskClient) -> None:
    """Until every task of the pool is acknowledged (acked entries are deleted)."""
    async with asyncio.timeout(300):
        while (await client.stats())["depth"] > 0:  # noqa: ASYNC110 - polls Redis: no event to wait on
            await asyncio.sleep(0.5)


async def read_pickups(client: TaskClient, task_ids: Sequence[str]) -> list[float]:
    """submit -> first attempt start per task, on Redis' clock."""
    out: list[float] = []
    for chunk in range(0, len(task_ids), 200):
        async with client.redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids[chunk : chunk + 200]:
                pipe.hget(client.keys.task(task_id), "submitted_at")
                pipe.xrange(client.keys.chunks(task_id), count=1)
            replies = await pipe.execute()
        for submitted, events in zip(replies[::2], replies[1::2], strict=True):
            [(start_id, fields)] = events
            assert fields[b"event"] == b"start", fields
            out.append(pickup_s(float(submitted), start_id.decode()))
    return out


async def sustained(client: TaskClient, rate: float, seconds: float) -> list[str]:
    """`rate` tasks/s on a fixed schedule (each submit at its slot, not after the last one)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    ids = []
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(start + i / rate - loop.time(), 0))
        ids.append((await client.submit_payload(TASK, PRIORITIES[i % len(PRIORITIES)])).task_id)
    return ids


async def burst(client: TaskClient, count: int) -> list[str]:
    """`count` tasks at once (32 submits in flight through the port-forward)."""
    gate = asyncio.Semaphore(32)

    async def one(i: int) -> str:
        async with gate:
            return (await client.submit_payload(TASK, PRIORITIES[i % len(PRIORITIES)])).task_id

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def settled(kube: Kube, namespace: str) -> bool:
    """The pool at its warm floor, every agent idle and Ready."""
    status = kube.get("agentpool", POOL, namespace).get("status", {})
    live = [p for p in kube.pods(namespace, f"{contract.POOL_LABEL}={POOL}") if is_live(p)]
    return bool(
        status.get("desiredReplicas") == WARM
        and status.get("ready") == WARM
        and status.get("warm") == WARM
        and len(live) == WARM
    )


def histogram_quantiles(
    prom: Prometheus, namespace: str, window: tuple[float, float]
) -> dict[str, float | None]:
    """p50/p99 of the agents' tars_task_pickup_seconds over the window, as Prometheus computes them."""
    start, end = window
    rng = f"{max(int(end - start), 1)}s"
    out: dict[str, float | None] = {}
    for q in (0.5, 0.99):
        promql = (
            f"histogram_quantile({q}, sum by (le) (increase("
            f'{metric_names.TASK_PICKUP_SECONDS}_bucket{{namespace="{namespace}"}}[{rng}])))'
        )
        result = prom.api("/api/v1/query", query=promql, time=f"{end:.3f}")["result"]
        out[f"p{round(q * 100)}"] = float(result[0]["value"][1]) if result else None
    return out


async def phases(
    kube: Kube, prom: Prometheus, op: OperatorEnv, namespace: str, api: str, r: Results, burst_size: int
) -> None:
    watch = PoolWatch(api, namespace)
    watch.start()
    sampler = Sampler(api, namespace)
    sampler.start()
    try:
        kubectl = Kubectl(kube.kubectl_bin, kube.kubeconfig)
        with kubectl.service_address(op.namespace, f"{op.release}-redis", 6379) as (host, port):
            print(f"submitting to Redis at {host}:{port}", flush=True)
            redis = aioredis.Redis(host=host, port=port, password=op.redis_password())
            client = TaskClient(redis, namespace, POOL)
            # (a) sustained
            print(f"(a) {r.sustained_rate:g} tasks/s for {r.sustained_s:g} s", flush=True)
            started = time.time()
            ids = await sustained(client, r.sustained_rate, r.sustained_s)
            r.sustained_window = (started, time.time())
            r.load_average.append(("(a) sustained", os.getloadavg()[0]))
            r.sustained = await pickups(client, ids)
            # the agents' histogram, once Prometheus scraped the last observations (every 2 s)
            await asyncio.sleep(6)  # three scrape intervals: the last observations reach Prometheus
            r.prometheus = histogram_quantiles(prom, namespace, (started, r.sustained_window[1] + 5))
            # (b) burst on the settled pool
            print("(b) waiting for the pool to settle at its warm floor", flush=True)
            await asyncio.to_thread(eventually, lambda: settled(kube, namespace), 180, "the pool settled")
            print(f"(b) {burst_size}-task burst", flush=True)
            before = set(watch.seen_at)
            r.burst_at = time.time()
            cpu_before = read_cpu()
            ids = await burst(client, burst_size)
            await all_done(client)
            cpu_after = read_cpu()
            if cpu_before and cpu_after:
                r.burst_cpu = cpu_share(cpu_before, cpu_after)
            r.burst = await read_pickups(client, ids)
            r.load_average.append(("(b) burst", os.getloadavg()[0]))
            # the operator's new agents come up whether or not the burst still needs them
            new = [n for n in watch.seen_at if n not in before]
            await asyncio.to_thread(
                eventually, lambda: all(n in watch.ready_at for n in new), 120, "the new agents Ready"
            )
            r.burst_refill = refill(
                r.burst_at, [watch.seen_at[n] for n in new], [watch.ready_at[n] for n in new]
            )
            await redis.aclose()
    finally:
        sampler.stop()
        watch.stop()
    r.samples = sampler.samples
    dropped = [s for s in r.samples if s.t >= r.burst_at and s.warm is not None and s.warm < WARM]
    if dropped:
        back = [s for s in r.samples if s.t > dropped[0].t and s.warm is not None and s.warm >= WARM]
        r.warm_floor_back_s = back[0].t - r.burst_at if back else None


def run(args: argparse.Namespace, r: Results) -> None:
    kube = Kube(Path(args.kubeconfig), str(Path(sys.executable).parent / "kubectl"))
    namespace_, _, rest = PROMETHEUS.partition("/")
    service, _, port = rest.partition(":")
    prom = Prometheus(kube, namespace_, service, int(port))
    with temporary_namespace(kube, "bench-pickup") as namespace:
        release_ns = f"{namespace}-op"
        kube.run("create", "namespace", release_ns)
        values = e2e_values(prom) | {"watchNamespaces": [namespace]}
        op = OperatorEnv(kube, Helm(find_helm(), kube), prom, release_ns, values=values)
        try:
            print(f"installing the chart (release {release_ns}/{op.release})", flush=True)
            op.install()
            op.wait_leader()
            kube.apply(pool_manifest(upstream(kube, namespace)), namespace=namespace)
            eventually(lambda: settled(kube, namespace), 180, f"{WARM} warm agents")
            print(f"pool {namespace}/{POOL}: {WARM} warm agents x {SLOTS} slots", flush=True)
            with Kubectl(kube.kubectl_bin, kube.kubeconfig).proxy() as api:
                asyncio.run(phases(kube, prom, op, namespace, api, r, args.burst))
        finally:
            op.helm.run("uninstall", op.release, "-n", release_ns, timeout=120, check=False)
            kube.run("delete", "namespace", release_ns, "--wait=false", check=False)
    # (c) cold, by coldwarm's rounds in a namespace of their own
    print(f"(c) cold path: {args.cold_rounds} rounds of bench/coldwarm.py", flush=True)
    cfg = coldwarm.Config(
        Kubectl(kube.kubectl_bin, kube.kubeconfig),
        IMAGES.agent,
        IMAGES.redis,
        args.cold_rounds,
        1,
        OUT,
    )
    cold = coldwarm.collect(cfg, f"bench-pickup-cold-{int(time.time())}")
    r.cold_ready, r.cold_first_task = cold.cold_ready, cold.cold_first_task
    r.load_average.append(("(c) cold", os.getloadavg()[0]))


def report(r: Results) -> str:
    warm, burst_q = quantiles(r.sustained), quantiles(r.burst)
    cold = quantiles(r.cold_first_task)["p50"] if r.cold_first_task else None
    during = [s for s in r.samples]
    lines = [
        comparison(warm, burst_q, cold, max_excess(during), r.prometheus),
        "",
        f"{'phase':<34}{'n':>6}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}",
    ]
    for label, q in (
        (f"(a) {r.sustained_rate:g}/s sustained", warm),
        (f"(b) {len(r.burst)}-task burst", burst_q),
        *(
            [
                ("(c) cold: create -> Ready", quantiles(r.cold_ready)),
                ("(c) cold: create -> first task", quantiles(r.cold_first_task)),
            ]
            if r.cold_first_task
            else []
        ),
    ):
        cells = "".join(f"{q[k] * 1000:>8.1f}ms" for k in ("p50", "p90", "p99", "max"))
        lines.append(f"{label:<34}{int(q['n']):>6}{cells}")
    f = r.burst_refill
    lines += [
        "",
        f"burst refill: {f.get('new_agents', 0):.0f} new agents, Ready {f.get('first_ready_s', 0):.1f} s "
        f"to {f.get('last_ready_s', 0):.1f} s after the burst: {f.get('agents_per_s', 0):.2f} agents/s; "
        "warm floor back "
        + (
            f"{r.warm_floor_back_s:.1f} s after the burst"
            if r.warm_floor_back_s is not None
            else "(never dropped)"
        ),
        (
            f"CPU from the burst to its last task ({c['seconds']:.1f} s): the machine "
            f"{c['machine_cores']:.2f} cores busy of {os.cpu_count()}, "
            f"the node's pods {c['pods_cores']:.2f}, "
            f"the rest (the node's daemons, the kernel, this benchmark) {c['rest_cores']:.2f}"
            if (c := r.burst_cpu)
            else "CPU during the burst: n/a (the node's pods are not on this machine)"
        ),
        f"pool samples: {len(r.samples)}, peak live {max((s.live for s in r.samples), default=0)}, "
        f"peak desired {max((s.desired or 0 for s in r.samples), default=0)}, "
        f"max(live - (desired + surge)) = {max_excess(r.samples)}",
        "host load average (1 min) at the end of: "
        + ", ".join(f"{phase} {load:.1f}" for phase, load in r.load_average)
        + f" on {os.cpu_count()} cores",
    ]
    return "\n".join(lines)


def plot(path: Path, r: Results, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for values, label in ((r.sustained, f"(a) {r.sustained_rate:g}/s"), (r.burst, "(b) burst")):
        ordered = sorted(v * 1000 for v in values)
        left.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)
    if r.cold_first_task:
        left.axvline(coldwarm.percentile(r.cold_first_task, 0.5) * 1000, color="k", ls=":", label="cold p50")
    left.axvline(92, color="#c44", ls="--", lw=1, label="agent-sandbox warm p50")
    left.axvline(1470, color="#c84", ls="--", lw=1, label="agent-sandbox burst p50")
    left.set_xscale("log")
    left.set_xlabel("submit -> start (ms, log)")
    left.set_ylabel("fraction of tasks")
    left.legend(fontsize=7)
    left.grid(alpha=0.3, which="both")
    t0 = r.samples[0].t if r.samples else 0
    ts = [s.t - t0 for s in r.samples]
    right.step(ts, [s.live for s in r.samples], where="post", label="live pods")
    right.step(
        ts, [(s.desired or 0) + s.surge for s in r.samples], where="post", ls="--", label="desired + surge"
    )
    right.step(ts, [s.ready for s in r.samples], where="post", label="ready")
    right.axvline(r.burst_at - t0, color="#999", lw=1)
    right.set_xlabel("seconds")
    right.set_ylabel("agent pods")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", help="default: the local cluster's")
    parser.add_argument("--rate", type=float, default=45.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--burst", type=int, default=300)
    parser.add_argument("--cold-rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.kubeconfig is None:
        from tars_localcluster.config import ClusterConfig

        args.kubeconfig = str(ClusterConfig.default().admin_kubeconfig)
    command = shlex.join(["python", "bench/warm_pickup.py", *(sys.argv[1:] if argv is None else argv)])
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"command: {command}\ndate: {when}\nmachine: {coldwarm.machine()}", flush=True)
    r = Results(args.rate, args.seconds)
    run(args, r)
    text = report(r)
    print()
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "warm_pickup.json").write_text(json.dumps(asdict(r) | {"command": command, "date": when}))
    plot(args.out / "warm_pickup.png", r, f"{command} | {when} | {coldwarm.machine()}")
    print(f"\nwrote {args.out / 'warm_pickup.png'} and {args.out / 'warm_pickup.json'}")


if __name__ == "__main__":
    main()
