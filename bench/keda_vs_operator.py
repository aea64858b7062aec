"""Scale reaction: an AgentPool against real KEDA, one after the other in one run, on the local
cluster's real node: the same agent pods, the same Redis queue, the same Prometheus and query, the
same burst.

Contenders (in this order):
* operator:     an AgentPool, threshold 50 and the defaults (interval 10 s, warm 3, max 10), except
                scaleDown.stabilizationWindow 30 s so that its scale-in falls inside the run;
* keda-default: a Deployment of the same pods (tars_operator.builders.render) and a KEDA
                ScaledObject, Prometheus trigger on the operator's own query, threshold 50, min 3
                (the pool's warm floor), max 10, KEDA's defaults: pollingInterval 30 s,
                cooldownPeriod 300 s, the HPA's 15 s sync and 300 s scale-down window;
* keda-5s:      the same with pollingInterval 5 s, cooldownPeriod 30 s and the HPA's scale-down
                window 30 s (advanced.horizontalPodAutoscalerConfig), so that its scale-in too falls
                inside the run.
(`--contenders` adds operator-2s: the AgentPool with scaling.interval 2 s.)

Each gets a burst of --burst tasks submitted at once, then a trickle of --trickle tasks/s (so that
agents are busy while the pool shrinks), agents with concurrency 1 and an upstream (the mock LLM)
answering in --latency s. Measured from the queue crossing the threshold (0.5 s sampler on the
queue in Redis): the scale decision (AgentPool status.desiredReplicas, Deployment spec.replicas as
the HPA sets it), the first new agent Ready (pod watch), the backlog drained (queue back to 0);
during scale-in: pods deleted while they had a task in flight (XPENDING of the pod's consumer at
the moment its deletion was seen), tasks re-delivered (more than one attempt began) and tasks lost.

    make bench-keda                                   # builds KEDA once (~15-30 min), ~15 min
    python bench/keda_vs_operator.py --contenders operator,keda-5s
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import secrets
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis
import yaml
from redis.exceptions import ResponseError

import keda_install
from coldwarm import machine
from tars_agent.client import TaskClient
from tars_agent.queue import PoolKeys, QueueFull, Submitted
from tars_agent.tasks import TaskResult
from tars_contract import contract
from tars_localcluster.config import ClusterConfig
from tars_localcluster.demo import helm_upgrade_install
from tars_localcluster.kubectl import Kubectl
from tars_operator import builders, models, queries

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out"
TASK = {"messages": [{"role": "user", "content": "work"}], "max_tokens": 4}
RELEASE, RELEASE_NAMESPACE = "tars-operator-bench-keda", "bench-keda-system"
THRESHOLD, FLOOR, CEILING = 50, 3, 10
SAMPLE_S = 0.5
SUBMITTERS = 32
JSON = dict[str, Any]


@dataclass(frozen=True)
class Contender:
    name: str
    label: str
    keda: bool
    interval_s: int | None = None  # AgentPool scaling.interval (None: the default 10 s)
    polling_s: int | None = None  # ScaledObject pollingInterval (None: KEDA's default 30 s)
    cooldown_s: int | None = None  # ScaledObject cooldownPeriod (None: KEDA's default 300 s)
    scale_down_window_s: int | None = None  # the HPA's scale-down stabilization (None: 300 s)


CONTENDERS = {
    c.name: c
    for c in (
        Contender("operator", "AgentPool: threshold 50, defaults (scale-down window 30 s)", keda=False),
        Contender("operator-2s", "AgentPool: as above, scaling.interval 2 s", keda=False, interval_s=2),
        Contender("keda-default", "KEDA: polling 30 s, cooldown 300 s, HPA sync 15 s", keda=True),
        Contender(
            "keda-5s",
            "KEDA: polling 5 s, cooldown 30 s, HPA scale-down window 30 s",
            keda=True,
            polling_s=5,
            cooldown_s=30,
            scale_down_window_s=30,
        ),
    )
}
DEFAULT_CONTENDERS = ("operator", "keda-default", "keda-5s")


@dataclass
class Sample:
    t: float  # host clock
    queue: int
    desired: int | None
    ready: int
    live: int  # pods not being deleted


@dataclass
class Killed:
    pod: str
    at: float
    inflight: int  # tasks pending on the pod's consumer when its deletion was seen


@dataclass
class Run:
    contender: str
    round: int = 1
    samples: list[Sample] = field(default_factory=list)
    ready_at: dict[str, float] = field(default_factory=dict)  # pod -> first seen Ready
    initial_pods: set[str] = field(default_factory=set)
    deleted: list[Killed] = field(default_factory=list)
    burst_at: float = 0.0
    tasks: int = 0
    redelivered: int = 0
    lost: int = 0
    refused: int = 0  # trickle submissions the full queue refused


# ---- pure: the contenders' objects ------------------------------------------------------------


def pool_spec(cfg: Config, contender: Contender) -> JSON:
    """The AgentPool spec both contenders' pods come from."""
    scaling: JSON = {"queueDepth": {"threshold": THRESHOLD}, "scaleDown": {"stabilizationWindow": "30s"}}
    if contender.interval_s is not None:
        scaling["interval"] = f"{contender.interval_s}s"
    return {
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "agent",
                        "image": cfg.agent_image,
                        "imagePullPolicy": "IfNotPresent",
                        "env": [
                            {"name": contract.ENV_LLM_BASE_URL, "value": "http://mock-llm:8000/v1"},
                            {"name": contract.ENV_CONCURRENCY, "value": "1"},
                        ],
                    }
                ]
            }
        },
        "replicas": {"min": 1, "max": CEILING},
        "warm": {"min": FLOOR},
        "scaling": scaling,
    }


def agent_pool(cfg: Config, contender: Contender, namespace: str) -> JSON:
    return {
        "apiVersion": models.API_VERSION,
        "kind": models.KIND,
        "metadata": {"name": contender.name, "namespace": namespace},
        "spec": pool_spec(cfg, contender),
    }


def keda_objects(
    cfg: Config, contender: Contender, namespace: str, redis_url: str, redis_password: str, prometheus: str
) -> list[JSON]:
    """The pool Secret, a Deployment of the pods the operator would create for the same spec, and
    the ScaledObject on the operator's query."""
    spec = models.AgentPoolSpec.model_validate(pool_spec(cfg, contender))
    ref = builders.PoolRef(contender.name, namespace, uid=uuid.uuid4().hex)
    defaults = builders.OperatorDefaults(redis_url=redis_url, redis_password=True)
    pod = builders.render(ref, spec, None, defaults)
    secret = builders.pool_secret(ref, secrets.token_hex(16), redis_password)
    for obj in (pod, secret):
        del obj["metadata"]["ownerReferences"]
    labels = {contract.POOL_LABEL: contender.name}
    template_meta = {k: v for k, v in pod["metadata"].items() if k in ("labels", "annotations")}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": contender.name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": FLOOR,
            "selector": {"matchLabels": labels},
            "template": {"metadata": template_meta, "spec": pod["spec"]},
        },
    }
    scaled: JSON = {
        "scaleTargetRef": {"name": contender.name},
        "minReplicaCount": FLOOR,
        "maxReplicaCount": CEILING,
        "triggers": [
            {
                "type": "prometheus",
                "metadata": {
                    "serverAddress": prometheus,
                    "query": queries.queue_depth(spec, contender.name, namespace),
                    "threshold": str(THRESHOLD),
                },
            }
        ],
    }
    if contender.polling_s is not None:
        scaled["pollingInterval"] = contender.polling_s
    if contender.cooldown_s is not None:
        scaled["cooldownPeriod"] = contender.cooldown_s
    if contender.scale_down_window_s is not None:
        scaled["advanced"] = {
            "horizontalPodAutoscalerConfig": {
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": contender.scale_down_window_s}}
            }
        }
    scaled_object = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": contender.name, "namespace": namespace},
        "spec": scaled,
    }
    return [secret, deployment, scaled_object]


# ---- pure: what a run measured ----------------------------------------------------------------


@dataclass(frozen=True)
class Reaction:
    crossing: float | None  # host clock
    decision: float | None  # seconds after the crossing
    first_ready: float | None
    drained: float | None
    peak_desired: int
    busy_killed: int
    deleted: int


def reaction(run: Run) -> Reaction:
    after = [s for s in run.samples if s.t >= run.burst_at]
    before = [s for s in run.samples if s.t < run.burst_at]
    base_desired = next((s.desired for s in reversed(before) if s.desired is not None), FLOOR)
    crossing = next((s.t for s in after if s.queue > THRESHOLD), None)
    peak = max((s.desired or 0 for s in after), default=0)
    deleted = [k for k in run.deleted if k.at >= run.burst_at]
    busy = sum(1 for k in deleted if k.inflight > 0)
    if crossing is None:
        return Reaction(None, None, None, None, peak, busy, len(deleted))
    decision = next((s.t for s in after if s.t >= crossing and (s.desired or 0) > base_desired), None)
    new_ready = [t for pod, t in run.ready_at.items() if pod not in run.initial_pods and t >= crossing]
    drained = next((s.t for s in after if s.t > crossing and s.queue == 0), None)

    def since(t: float | None) -> float | None:
        return None if t is None else t - crossing

    return Reaction(
        crossing,
        since(decision),
        since(min(new_ready, default=None)),
        since(drained),
        peak,
        busy,
        len(deleted),
    )


def _s(value: float | None) -> str:
    return "   -" if value is None else f"{value:6.1f}"


def median_of(values: Sequence[float | None]) -> float | None:
    """The median of the values measured (None: not reached in that run)."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def table(runs: Sequence[Run]) -> str:
    head = (
        f"{'contender':<14}{'round':>6}{'decision s':>11}{'1st Ready s':>12}{'drained s':>10}{'peak':>6}"
        f"{'deleted':>8}{'busy killed':>12}{'redelivered':>12}{'lost':>6}{'tasks':>7}"
    )
    lines = [head]
    for run in runs:
        r = reaction(run)
        lines.append(
            f"{run.contender:<14}{run.round:>6}{_s(r.decision):>11}{_s(r.first_ready):>12}{_s(r.drained):>10}"
            f"{r.peak_desired:>6}{r.deleted:>8}{r.busy_killed:>12}{run.redelivered:>12}{run.lost:>6}{run.tasks:>7}"
        )
    for run in runs:
        if run.refused:
            lines.append(f"{run.contender}: the full queue refused {run.refused} trickle submissions")
    by_contender: dict[str, list[Reaction]] = {}
    for run in runs:
        by_contender.setdefault(run.contender, []).append(reaction(run))
    medians = {
        name: (median_of([r.decision for r in rs]), median_of([r.first_ready for r in rs]), len(rs))
        for name, rs in by_contender.items()
    }
    ours_decision, ours_ready, rounds = medians.get("operator", (None, None, 0))
    if ours_decision:
        lines.append("")
        of = f" (medians of {rounds} rounds)" if rounds > 1 else ""
        for name, (decision, first_ready, _n) in medians.items():
            if decision and name.startswith("keda"):
                lines.append(
                    f"operator decides {decision / ours_decision:.1f}x sooner than {name}{of}"
                    + (
                        f"; first new agent Ready {first_ready / ours_ready:.1f}x sooner"
                        if first_ready and ours_ready
                        else ""
                    )
                )
    return "\n".join(lines)


# ---- the shell --------------------------------------------------------------------------------


@dataclass
class Config:
    kubectl: Kubectl
    agent_image: str
    contenders: list[Contender]
    burst: int
    trickle: float
    latency: float
    settle_s: float
    timeout_s: float
    out: Path
    rounds: int = 1


class PodWatch:
    """One watch on the namespace's pods: when each was first Ready, and for each pod whose deletion
    appears, how many tasks its agent had in flight at that moment (XPENDING of its consumer)."""

    def __init__(self, api: str, namespace: str, redis_client: redis.Redis) -> None:
        self.api, self.namespace, self.redis = api, namespace, redis_client
        self.run: Run | None = None
        self.pools: dict[str, PoolKeys] = {}
        self._seen_deleted: set[str] = set()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True

    def _loop(self) -> None:
        url = f"{self.api}/api/v1/namespaces/{self.namespace}/pods"
        while not self._stop:
            try:
                with httpx.stream("GET", url, params={"watch": "1"}, timeout=None) as resp:
                    for line in resp.iter_lines():
                        if self._stop:
                            return
                        self._event(json.loads(line)["object"], time.time())
            except httpx.HTTPError:
                time.sleep(0.2)  # the watch broke: open it again

    def _event(self, pod: JSON, now: float) -> None:
        run, name = self.run, pod["metadata"]["name"]
        pool = pod["metadata"].get("labels", {}).get(contract.POOL_LABEL)
        if run is None or pool != run.contender:
            return
        conditions = pod.get("status", {}).get("conditions", [])
        if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            run.ready_at.setdefault(name, now)
        if pod["metadata"].get("deletionTimestamp") and name not in self._seen_deleted:
            self._seen_deleted.add(name)
            run.deleted.append(Killed(name, now, self._inflight(PoolKeys(self.namespace, pool), name)))

    def _inflight(self, keys: PoolKeys, consumer: str) -> int:
        count = 0
        for stream in keys.streams:
            # No such stream or group yet: nothing pending there.
            with contextlib.suppress(ResponseError):
                count += len(
                    self.redis.xpending_range(
                        stream, contract.QUEUE_GROUP, "-", "+", 100, consumername=consumer
                    )
                )
        return count


def kubectl_json(kubectl: Kubectl, *args: str) -> JSON:
    return dict(json.loads(kubectl.run(*args, "-o", "json").stdout))


async def queue_depth(client: aioredis.Redis, keys: PoolKeys) -> int:
    """Tasks waiting: entries in the priority streams minus those delivered and not yet acked."""
    depth = 0
    for stream in keys.streams:
        length = int(await client.xlen(stream))
        pending = 0
        if length:
            try:
                pending = int((await client.xpending(stream, contract.QUEUE_GROUP))["pending"])
            except ResponseError:  # the agents have not created their group yet
                pending = 0
        depth += length - pending
    return depth


async def sample(api: httpx.AsyncClient, client: aioredis.Redis, keys: PoolKeys, c: Contender) -> Sample:
    namespace, name = keys.namespace, keys.pool
    if c.keda:
        got = await api.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}")
        desired = got.json().get("spec", {}).get("replicas") if got.status_code == 200 else None
    else:
        got = await api.get(f"/apis/tars.dev/v1alpha1/namespaces/{namespace}/agentpools/{name}")
        desired = got.json().get("status", {}).get("desiredReplicas") if got.status_code == 200 else None
    pods = await api.get(
        f"/api/v1/namespaces/{namespace}/pods", params={"labelSelector": f"{contract.POOL_LABEL}={name}"}
    )
    items = pods.json().get("items", []) if pods.status_code == 200 else []
    live = [p for p in items if not p["metadata"].get("deletionTimestamp")]
    ready = sum(
        1
        for p in live
        if any(
            c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", [])
        )
    )
    at = time.time()
    return Sample(at, await queue_depth(client, keys), desired, ready, len(live))


def attempts_begun(chunks: Any) -> int:
    """The "start" events of a task's chunk stream (XRANGE): one per attempt that began."""
    return sum(1 for _, fields in chunks or [] if fields and fields.get(b"event") == b"start")


async def until(check: Any, timeout_s: float, what: str) -> None:
    """Poll the async CHECK with a deadline."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(SAMPLE_S)


async def measure(
    cfg: Config, c: Contender, api_url: str, client: aioredis.Redis, run: Run, namespace: str
) -> Run:
    """The pool's objects exist (and the pod watch reports into RUN): wait for the floor, burst,
    trickle, sample until the backlog drained and --settle s passed, then account for every task."""
    keys = PoolKeys(namespace, c.name)
    tasks = TaskClient(client, namespace, c.name)
    async with httpx.AsyncClient(base_url=api_url, timeout=10) as api:
        # Warm: the floor's agents Ready and their queue depth known to Prometheus (the query
        # answers a number), so both contenders start from the same place.
        async def floor_ready() -> bool:
            s = await sample(api, client, keys, c)
            return s.ready >= FLOOR and s.live == s.ready

        await until(floor_ready, 240, f"{c.name}: {FLOOR} agents Ready")
        prom = "/api/v1/namespaces/monitoring/services/prometheus:9090/proxy/api/v1/query"
        query = queries.queue_depth(models.AgentPoolSpec.model_validate(pool_spec(cfg, c)), c.name, namespace)

        async def prometheus_sees_pool() -> bool:
            got = await api.get(prom, params={"query": query})
            return got.status_code == 200 and bool(got.json()["data"]["result"])

        await until(prometheus_sees_pool, 120, f"{c.name}: Prometheus to scrape the agents")
        if c.keda:

            async def hpa_ready() -> bool:
                got = await api.get(
                    f"/apis/autoscaling/v2/namespaces/{namespace}/horizontalpodautoscalers/keda-hpa-{c.name}"
                )
                conditions = (
                    got.json().get("status", {}).get("conditions", []) if got.status_code == 200 else []
                )
                return any(x["type"] == "ScalingActive" and x["status"] == "True" for x in conditions)

            await until(hpa_ready, 180, f"{c.name}: KEDA's HPA to read the external metric")
        stop = asyncio.Event()

        async def sampler() -> None:
            while not stop.is_set():
                began = time.monotonic()
                run.samples.append(await sample(api, client, keys, c))
                await asyncio.sleep(max(0.0, SAMPLE_S - (time.monotonic() - began)))

        sampling = asyncio.create_task(sampler())
        await asyncio.sleep(3)  # a few samples of the quiet pool
        run.initial_pods = set(run.ready_at)
        print(
            f"[{c.name}] {FLOOR} agents Ready; burst of {cfg.burst} tasks, then {cfg.trickle}/s", flush=True
        )
        run.burst_at = time.time()
        # At once, over at most SUBMITTERS connections (the Redis client's pool is bounded).
        gate = asyncio.Semaphore(SUBMITTERS)

        async def submit() -> Submitted:
            async with gate:
                return await tasks.submit_payload(TASK)

        async def result(task_id: str) -> TaskResult | None:
            async with gate:
                return await tasks.result(task_id)

        async def chunks(task_id: str) -> Any:
            async with gate:
                return await client.xrange(keys.chunks(task_id))

        try:
            submitted = list(await asyncio.gather(*(submit() for _ in range(cfg.burst))))
        except BaseException:
            stop.set()
            await sampling
            raise

        async def trickle() -> None:
            while not stop.is_set():
                try:
                    submitted.append(await tasks.submit_payload(TASK))
                except QueueFull:  # backpressure: this one is not submitted, and so not counted
                    run.refused += 1
                await asyncio.sleep(1 / cfg.trickle)

        trickler = asyncio.create_task(trickle())
        drained_at: float | None = None
        deadline = time.monotonic() + cfg.timeout_s
        printed = 0
        while time.monotonic() < deadline:
            await asyncio.sleep(SAMPLE_S)
            after = [x for x in run.samples if x.t >= run.burst_at]
            if not after:
                continue
            s = after[-1]
            crossed = any(x.queue > THRESHOLD for x in after)
            if crossed and drained_at is None and s.queue == 0:
                drained_at = time.monotonic()
                print(f"[{c.name}] backlog drained {s.t - run.burst_at:.1f} s after the burst", flush=True)
            if drained_at is not None and time.monotonic() - drained_at >= cfg.settle_s:
                break
            if len(after) // 20 > printed:
                printed = len(after) // 20
                print(
                    f"[{c.name}] t={s.t - run.burst_at:5.1f}s queue {s.queue:>4}"
                    f" desired {s.desired} ready {s.ready} live {s.live}",
                    flush=True,
                )
        stop.set()
        await asyncio.gather(trickler, sampling)
        # Every task must finish: what does not was lost.
        ids = [t.task_id for t in submitted]

        async def all_finished() -> bool:
            results = await asyncio.gather(*(result(i) for i in ids))
            return all(r is not None and r.status in ("done", "dead") for r in results)

        try:
            await until(all_finished, 120, f"{c.name}: every task to finish")
        except SystemExit as exc:
            print(f"[{c.name}] {exc}", flush=True)
        results = await asyncio.gather(*(result(i) for i in ids))
        run.tasks = len(ids)
        run.lost = sum(1 for r in results if r is None or r.status != "done")
        starts = await asyncio.gather(*(chunks(i) for i in ids))
        run.redelivered = sum(1 for entries in starts if attempts_begun(entries) > 1)
    return run


async def run_all(
    cfg: Config,
    api: str,
    redis_port: int,
    password: str,
    watch: PodWatch,
    namespace: str,
    pool_objects: dict[str, list[JSON]],
    runs: list[Run],
) -> None:
    """The contenders one after the other; each one's pods are gone before the next starts."""
    client = aioredis.Redis(port=redis_port, password=password)
    kubectl = cfg.kubectl
    for c in [c for _ in range(cfg.rounds) for c in cfg.contenders]:
        run = Run(c.name, round=1 + sum(1 for r in runs if r.contender == c.name))
        watch.run = run  # before the pods exist: their first Ready is seen
        kubectl.run("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(pool_objects[c.name]))
        runs.append(await measure(cfg, c, api, client, run, namespace))
        watch.run = None
        print(table([run]), flush=True)
        kind = "scaledobject,deployment" if c.keda else "agentpool"
        kubectl.run("delete", "-n", namespace, kind, c.name, "--wait=true", "--timeout=180s", check=False)
        selector = f"{contract.POOL_LABEL}={c.name}"
        kubectl.run(
            "wait", "-n", namespace, "--for=delete", "pod", "-l", selector, "--timeout=180s", check=False
        )
    await client.aclose()


def infrastructure(cfg: Config) -> list[JSON]:
    """The mock LLM (examples/mock-llm.yaml) without a rate limit, answering in cfg.latency s."""
    upstream = list(yaml.safe_load_all((REPO / "examples" / "mock-llm.yaml").read_text()))
    container = upstream[0]["spec"]["template"]["spec"]["containers"][0]
    container["image"] = cfg.agent_image
    container["args"] = ["--host=0.0.0.0", "--port=8000", f"--latency={cfg.latency}", "--response-tokens=4"]
    return upstream


def helm_install(cfg: Config, cluster: ClusterConfig, namespace: str) -> tuple[str, str, str]:
    """The operator by helm (as `make demo` does), watching only the bench's namespace; returns its
    Redis URL, the Redis password and its Prometheus URL."""
    helm_upgrade_install(cluster, RELEASE, RELEASE_NAMESPACE, namespace)
    deployment = kubectl_json(cfg.kubectl, "get", "deployment", RELEASE, "-n", RELEASE_NAMESPACE)
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--") and "=" in a)
    secret = kubectl_json(cfg.kubectl, "get", "secret", f"{RELEASE}-redis", "-n", RELEASE_NAMESPACE)
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    return flags["redis-url"], password, flags["prometheus-url"]


def plot(path: Path, runs: Sequence[Run], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.8 * len(runs)), sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        r = reaction(run)
        t0 = r.crossing or run.burst_at
        xs = [s.t - t0 for s in run.samples]
        ax.plot(xs, [s.queue for s in run.samples], color="tab:gray", label="queue depth")
        ax.axhline(THRESHOLD, color="tab:gray", linestyle=":", linewidth=0.8)
        ax.set_ylabel("tasks waiting")
        right = ax.twinx()
        right.step(xs, [s.desired or 0 for s in run.samples], where="post", color="tab:blue", label="desired")
        right.step(xs, [s.ready for s in run.samples], where="post", color="tab:green", label="ready")
        right.set_ylim(0, CEILING + 1)
        right.set_ylabel("agents")
        for k in run.deleted:
            if k.inflight:
                right.plot(k.at - t0, 0.3, "rx")
        for value, name in ((r.decision, "decision"), (r.first_ready, "1st Ready"), (r.drained, "drained")):
            if value is not None:
                ax.axvline(value, color="tab:red", linestyle="--", linewidth=0.7)
                ax.text(value, ax.get_ylim()[1] * 0.9, f" {name} {value:.1f}s", fontsize=7, color="tab:red")
        ax.set_title(f"{run.contender} (round {run.round}): {CONTENDERS[run.contender].label}", fontsize=9)
        lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        ax.legend(lines, [str(x.get_label()) for x in lines], loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds after the queue crossed the threshold (x = a busy agent's pod deleted)")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: Sequence[str] | None) -> tuple[Config, bool]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--contenders", default=",".join(DEFAULT_CONTENDERS), help=f"of {', '.join(CONTENDERS)}"
    )
    parser.add_argument("--burst", type=int, default=400)
    parser.add_argument("--trickle", type=float, default=1.5, help="tasks/s after the burst")
    parser.add_argument("--latency", type=float, default=1.5, help="the mock LLM's seconds per answer")
    parser.add_argument(
        "--settle", type=float, default=75.0, help="seconds observed after the backlog drained"
    )
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per contender at most")
    parser.add_argument("--agent-image", default="ghcr.io/tars-dev/tars-agent:0.1.0")
    parser.add_argument("--keep-keda", action="store_true", help="leave KEDA installed afterwards")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the contenders this many times over (medians)"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    unknown = [n for n in args.contenders.split(",") if n not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    cluster = ClusterConfig.default()
    kubectl = Kubectl(str(Path(sys.executable).parent / "kubectl"), str(cluster.admin_kubeconfig))
    contenders = [CONTENDERS[n] for n in args.contenders.split(",")]
    cfg = Config(
        kubectl,
        args.agent_image,
        contenders,
        args.burst,
        args.trickle,
        args.latency,
        args.settle,
        args.timeout,
        args.out,
        max(args.rounds, 1),
    )
    return cfg, args.keep_keda


def keda_images() -> keda_install.Images:
    """Build KEDA's images (from hack/build-keda.sh's binaries) and import them into the node."""
    from tars_localcluster import images

    built = images.build(["keda-operator", "keda-adapter"])
    images.import_into(
        str(ClusterConfig.default().containerd_socket), names=["keda-operator", "keda-adapter"]
    )
    return keda_install.Images(built["keda-operator"].ref, built["keda-adapter"].ref)


def keda_module_dir() -> Path:
    out = subprocess.run(
        ["bash", str(REPO / "hack" / "build-keda.sh"), "--print-module-dir"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def main(argv: Sequence[str] | None = None) -> None:
    cfg, keep_keda = parse_args(argv)
    cluster = ClusterConfig.default()
    namespace = f"bench-keda-{uuid.uuid4().hex[:6]}"
    command = "python bench/keda_vs_operator.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(
        f"command: {command.strip()}\nmachine: {machine()}\ndate: {started}\nnamespace: {namespace}",
        flush=True,
    )
    kubectl = cfg.kubectl
    runs: list[Run] = []
    try:
        if any(c.keda for c in cfg.contenders):
            took = keda_install.install(kubectl, keda_module_dir(), keda_images())
            print(
                f"KEDA installed; APIService {keda_install.APISERVICE} Available after {took:.0f} s",
                flush=True,
            )
        kubectl.run("create", "namespace", namespace)
        redis_url, password, prometheus = helm_install(cfg, cluster, namespace)
        kubectl.run("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(infrastructure(cfg)))
        kubectl.run("rollout", "status", "-n", namespace, "deployment/mock-llm", "--timeout=120s")
        redis_host = f"svc/{RELEASE}-redis"
        with kubectl.proxy() as api, kubectl.port_forward(RELEASE_NAMESPACE, redis_host, 6379) as port:
            watch = PodWatch(api, namespace, redis.Redis(port=port, password=password))
            watch.start()
            pool_objects = {
                c.name: (
                    keda_objects(cfg, c, namespace, redis_url, password, prometheus)
                    if c.keda
                    else [agent_pool(cfg, c, namespace)]
                )
                for c in cfg.contenders
            }
            asyncio.run(run_all(cfg, api, port, password, watch, namespace, pool_objects, runs))
            watch.stop()
    finally:
        kubectl.run("delete", "namespace", namespace, "--wait=false", check=False)
        subprocess.run(
            [
                str(cluster.bin_dir / "helm"),
                f"--kubeconfig={cluster.admin_kubeconfig}",
                "uninstall",
                RELEASE,
                "-n",
                RELEASE_NAMESPACE,
            ],
            check=False,
            capture_output=True,
        )
        kubectl.run("delete", "namespace", RELEASE_NAMESPACE, "--wait=false", check=False)
        if not keep_keda:
            keda_install.uninstall(kubectl)
    if not runs:
        return
    report = table(runs)
    print(f"\n{report}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "keda_vs_operator.json").write_text(
        json.dumps(
            [
                {
                    **run.__dict__,
                    "initial_pods": sorted(run.initial_pods),
                    "samples": [s.__dict__ for s in run.samples],
                    "deleted": [k.__dict__ for k in run.deleted],
                }
                for run in runs
            ],
            indent=1,
        )
    )
    plot(cfg.out / "keda_vs_operator.png", runs, f"{command.strip()} | {started} | {machine()}")
    print(f"\nwrote {cfg.out / 'keda_vs_operator.png'} and {cfg.out / 'keda_vs_operator.json'}")


if __name__ == "__main__":
    main()
