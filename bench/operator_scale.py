"""The operator at scale: 100 AgentPools x 20 agents = 2,000 agent pods on kwok-simulated nodes.

Measures the operator process (`tars-operator`, the flags it runs with in-cluster) at steady state
and during a scale event (the queue of 10 pools rises above the threshold): its RSS and CPU (from
/proc), its requests to the API server per second (the API server's audit log, by the operator's
user), its status writes per second, the agents' GET /status it sends per second, the decision
latency (tars_operator_decision_seconds: observation -> plan, p99 from the histogram's buckets)
and how fast the raised pools' desiredReplicas and ready agents follow. CPU of the API server,
etcd, kwok, Prometheus and the stand-in is reported for context.

Everything runs in a network namespace of its own (the script re-executes itself under
`unshare --net`): its own etcd, kube-apiserver and kube-scheduler (binaries from `make
cluster-build`, PKI generated into a temp dir), kwok (hack/build-kwok.sh) simulating the nodes
and pods with pod IPs in 127.1.0.0/16, i.e. on the namespace's loopback, where one stand-in
(bench/scale_standin.py) answers every simulated agent's /status and /drain and exports their
metrics to a real Prometheus; a real redis-server. Nothing of the shared local cluster is used.

    make bench-scale                       # ~12 min: 100 pools x 20 agents
    python bench/operator_scale.py --quick # ~4 min: 10 pools x 20 agents, a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from scale_stats import (
    AuditCount,
    ProcSample,
    bucket_delta,
    count_audit,
    cpu_percent,
    fmt,
    histogram_buckets,
    histogram_quantile,
    parse_proc,
    render_table,
)
from tars_contract import metric_names
from tars_localcluster.cluster import write_kubeconfig
from tars_localcluster.config import cache_dir
from tars_localcluster.pki import ClientIdentity, Pki, ServingIdentity

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out"
NETNS_MARK = "TARS_SCALE_NETNS"
NAMESPACE = "bench"
OPERATOR_USER = "tars-operator"
POD_CIDR = "127.1.0.1/16"  # on the namespace's loopback: the stand-in answers every pod IP
PODS_PER_NODE = 500
APISERVER = "https://127.0.0.1:6443"
ETCD_PORT, PROMETHEUS_PORT, REDIS_PORT, EXPORTER_PORT = 2379, 9090, 6379, 9400
OPERATOR_METRICS_PORT, OPERATOR_HEALTH_PORT = 9100, 8081
KWOK_VERSION = "v0.8.0"
SCALE_WINDOW_S = 60.0
SCALED_QUEUE_DEPTH = 150  # threshold 50, 10 per agent: +10 agents per raised pool

ADMIN = ClientIdentity("admin", "tars-bench", ("system:masters",))
CLIENTS = {
    "admin": ADMIN,
    "operator": ClientIdentity("operator", OPERATOR_USER, ("system:masters",)),
    "kwok": ClientIdentity("kwok", "kwok", ("system:masters",)),
    "scheduler": ClientIdentity("scheduler", "system:kube-scheduler", ("system:masters",)),
    "standin": ClientIdentity("standin", "tars-standin", ("system:masters",)),
}
# The operator's ways of reading its agents' state; each runs against the same pods in one run.
MODES: dict[str, list[str]] = {
    "poll-every-agent": ["--agent-state=http"],  # before: GET /status of every ready agent every second
    "published-state": ["--agent-state=redis"],  # after: one MGET of the pool's published states
}


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class BenchError(RuntimeError):
    """A failure naming its cause (and the log to read)."""


@dataclass
class Proc:
    """A process this benchmark started (its own session): stopped by its pid only."""

    name: str
    popen: subprocess.Popen[bytes]
    log_file: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait()


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    token_key: str = field(default_factory=lambda: secrets.token_hex(32))

    # ---- processes -------------------------------------------------------------------------
    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        if not Path(argv[0]).exists():
            raise BenchError(
                f"{name}: {argv[0]} is missing (make cluster-build / hack/build-kwok.sh build it)"
            )
        log_file = self.tmp / "logs" / f"{name}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("ab") as out:
            popen = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        proc = Proc(name, popen, log_file)
        self.procs[name] = proc
        return proc

    def wait_for(self, what: str, check: Any, timeout: float, proc: Proc | None = None) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if proc is not None and not proc.alive():
                raise BenchError(f"{proc.name} exited while waiting for {what}; its log ends:\n{proc.tail()}")
            with contextlib.suppress(Exception):
                if check():
                    return time.monotonic() - started
            time.sleep(0.5)
        tail = f"; {proc.name}'s log ends:\n{proc.tail()}" if proc else ""
        raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()

    # ---- the control plane -------------------------------------------------------------------
    @property
    def pki(self) -> Pki:
        return Pki(self.tmp / "pki")

    def kubeconfig(self, client: str) -> Path:
        return self.tmp / f"{client}.kubeconfig"

    def client(self) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        ctx.load_cert_chain(str(self.pki.cert("admin")), str(self.pki.key("admin")))
        return httpx.Client(base_url=APISERVER, verify=ctx, timeout=30.0)

    def control_plane(self) -> None:
        bin_dir = cache_dir() / "bin"
        self.pki.ensure(
            [ServingIdentity("apiserver", "kube-apiserver", ips=("127.0.0.1",), names=("localhost",))],
            list(CLIENTS.values()),
        )
        for name, ident in CLIENTS.items():
            write_kubeconfig(self.kubeconfig(name), APISERVER, self.pki, ident.file_stem, ident.common_name)
        etcd = self.start(
            "etcd",
            [
                str(bin_dir / "etcd"),
                f"--data-dir={self.tmp / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{ETCD_PORT}",
                f"--advertise-client-urls=http://127.0.0.1:{ETCD_PORT}",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self.wait_for("etcd", lambda: httpx.get(f"http://127.0.0.1:{ETCD_PORT}/health").is_success, 60, etcd)
        audit_policy = self.tmp / "audit-policy.yaml"
        audit_policy.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "audit.k8s.io/v1",
                    "kind": "Policy",
                    "omitStages": ["RequestReceived"],
                    # Only the operator's requests: they are what we count.
                    "rules": [{"level": "Metadata", "users": [OPERATOR_USER]}, {"level": "None"}],
                }
            )
        )
        pki = self.pki
        apiserver = self.start(
            "kube-apiserver",
            [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{ETCD_PORT}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",  # a loopback advertise address needs it
                "--secure-port=6443",
                f"--tls-cert-file={pki.cert('apiserver')}",
                f"--tls-private-key-file={pki.key('apiserver')}",
                f"--client-ca-file={pki.ca_cert}",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--api-audiences=https://kubernetes.default.svc",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--authorization-mode=RBAC",
                # It taints new nodes not-ready until the node lifecycle controller (not run here:
                # no controller-manager) lifts it; kwok reports the nodes Ready itself.
                "--disable-admission-plugins=TaintNodesByCondition",
                f"--audit-policy-file={audit_policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--profiling=false",
                "--v=1",
            ],
        )

        def ready() -> bool:
            with self.client() as api:
                return api.get("/readyz").is_success

        self.wait_for("kube-apiserver /readyz", ready, 120, apiserver)
        scheduler_kc = str(self.kubeconfig("scheduler"))
        self.start(
            "kube-scheduler",
            [
                str(bin_dir / "kube-scheduler"),
                f"--kubeconfig={scheduler_kc}",
                f"--authentication-kubeconfig={scheduler_kc}",
                f"--authorization-kubeconfig={scheduler_kc}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=10259",
                "--v=1",
            ],
        )
        log(f"etcd, kube-apiserver and kube-scheduler are up ({(self.tmp / 'logs')})")

    @property
    def audit_log(self) -> Path:
        return self.tmp / "audit.log"

    def kwok(self) -> None:
        stages = cache_dir() / f"kwok-stages-{KWOK_VERSION}"
        configs = sorted(str(p) for p in stages.rglob("*.yaml") if p.name != "kustomization.yaml")
        # kwok plays 4 pod stages at a time by default: thousands of pods queue behind them.
        options = self.tmp / "kwok.yaml"
        options.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
                    "kind": "KwokConfiguration",
                    "options": {"podPlayStageParallelism": 32, "nodePlayStageParallelism": 8},
                }
            )
        )
        configs.append(str(options))
        proc = self.start(
            "kwok",
            [
                str(cache_dir() / "bin" / "kwok"),
                f"--kubeconfig={self.kubeconfig('kwok')}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--cidr={POD_CIDR}",
                "--node-ip=127.0.0.2",
                "--server-address=127.0.0.1:10247",
                *(f"--config={c}" for c in configs),
            ],
        )
        if not proc.alive():
            raise BenchError(f"kwok exited at once; its log ends:\n{proc.tail()}")

    def services(self) -> None:
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            raise BenchError("redis-server is missing: apt-get install -y redis-server")
        redis = self.start(
            "redis",
            [
                redis_server,
                "--port",
                str(REDIS_PORT),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
        )
        standin = self.start(
            "standin",
            [
                sys.executable,
                str(Path(__file__).resolve().parent / "scale_standin.py"),
                f"--api-url={APISERVER}",
                f"--ca={self.pki.ca_cert}",
                f"--cert={self.pki.cert('standin')}",
                f"--key={self.pki.key('standin')}",
                f"--namespace={NAMESPACE}",
                f"--exporter-port={EXPORTER_PORT}",
                f"--redis-url=redis://127.0.0.1:{REDIS_PORT}/0",
            ],
            env={"TARS_AGENT_TOKEN_KEY": self.token_key, "PYTHONPATH": str(Path(__file__).resolve().parent)},
        )
        prom_bin = cache_dir() / "bin" / "prometheus"
        prom_config = self.tmp / "prometheus.yml"
        prom_config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
                    "scrape_configs": [
                        {
                            "job_name": "agents",
                            "honor_labels": True,  # the stand-in sets namespace/pod as discovery would
                            "static_configs": [{"targets": [f"127.0.0.1:{EXPORTER_PORT}"]}],
                        }
                    ],
                }
            )
        )
        prometheus = self.start(
            "prometheus",
            [
                str(prom_bin),
                f"--config.file={prom_config}",
                f"--storage.tsdb.path={self.tmp / 'prometheus'}",
                f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
                "--log.level=warn",
            ],
        )
        self.wait_for("redis", lambda: _tcp_open(REDIS_PORT), 30, redis)
        self.wait_for("the stand-in", lambda: httpx.get(self.standin_url("/stats")).is_success, 60, standin)
        self.wait_for(
            "prometheus",
            lambda: httpx.get(f"http://127.0.0.1:{PROMETHEUS_PORT}/-/ready").is_success,
            60,
            prometheus,
        )

    def standin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{EXPORTER_PORT}{path}"

    # ---- objects --------------------------------------------------------------------------
    def objects(self, pools: int, per_pool: int) -> None:
        with self.client() as api:
            crd = yaml.safe_load((REPO / "crds" / "agentpool.yaml").read_text())
            _create(api, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
            _create(api, "/api/v1/namespaces", {"metadata": {"name": NAMESPACE}})
            # No controller-manager: the namespace's default ServiceAccount (pods need it) by hand.
            _create(api, f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts", {"metadata": {"name": "default"}})
            nodes = -(-pools * per_pool * 2 // PODS_PER_NODE)  # room for the scale event and more
            for i in range(nodes):
                _create(api, "/api/v1/nodes", _node(f"kwok-node-{i}"))

            def crd_ready() -> bool:
                got = api.get("/apis/tars.dev/v1alpha1/agentpools")
                return got.is_success

            self.wait_for("the AgentPool CRD", crd_ready, 60)
            for i in range(pools):
                _create(api, f"/apis/tars.dev/v1alpha1/namespaces/{NAMESPACE}/agentpools", _pool(i, per_pool))
        log(f"{nodes} kwok nodes, {pools} AgentPools of {per_pool} agents")

    def pool_status(self) -> dict[str, dict[str, Any]]:
        with self.client() as api:
            got = api.get(f"/apis/tars.dev/v1alpha1/namespaces/{NAMESPACE}/agentpools")
            got.raise_for_status()
            return {p["metadata"]["name"]: p.get("status") or {} for p in got.json()["items"]}

    def set_queue(self, depths: dict[str, float]) -> None:
        httpx.post(self.standin_url("/control"), json=depths).raise_for_status()

    # ---- the operator ---------------------------------------------------------------------
    def operator(self, mode: str) -> Proc:
        exe = Path(sys.executable).parent / "tars-operator"
        return self.start(
            f"operator-{mode}",
            [
                str(exe),
                f"--kubeconfig={self.kubeconfig('operator')}",
                "--no-leader-election",
                f"--prometheus-url=http://127.0.0.1:{PROMETHEUS_PORT}",
                f"--redis-url=redis://127.0.0.1:{REDIS_PORT}/0",
                f"--metrics-port={OPERATOR_METRICS_PORT}",
                f"--health-port={OPERATOR_HEALTH_PORT}",
                "--log-format=text",
                *MODES[mode],
            ],
            env={"TARS_AGENT_TOKEN_KEY": self.token_key},
        )


def _tcp_open(port: int) -> bool:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def _create(api: httpx.Client, path: str, body: dict[str, Any]) -> None:
    got = api.post(path, json=body)
    if got.status_code not in (200, 201, 409):
        raise BenchError(f"POST {path} failed: {got.status_code} {got.text[:500]}")


def _node(name: str) -> dict[str, Any]:
    capacity = {"cpu": "1000", "memory": "4Ti", "pods": str(PODS_PER_NODE)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"type": "kwok", "kubernetes.io/hostname": name},
        },
        "spec": {},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def pool_name(i: int) -> str:
    return f"pool-{i:03d}"


def _pool(i: int, per_pool: int) -> dict[str, Any]:
    return {
        "apiVersion": "tars.dev/v1alpha1",
        "kind": "AgentPool",
        "metadata": {"name": pool_name(i), "namespace": NAMESPACE},
        "spec": {
            "template": {"spec": {"containers": [{"name": "agent", "image": "tars-agent:bench"}]}},
            "replicas": {"min": 0, "max": per_pool * 2},
            "warm": {"min": per_pool},
            "scaling": {
                "interval": "10s",
                "maxSpawnPerInterval": per_pool,
                # Short, so that a raised pool is back at its floor before the next mode runs.
                "scaleDown": {"stabilizationWindow": "20s"},
            },
        },
    }


# ---- sampling -------------------------------------------------------------------------------


@dataclass
class Tick:
    at: float  # monotonic
    procs: dict[str, ProcSample]
    status_polls: int  # cumulative GET /status the stand-in answered
    audit: AuditCount  # operator requests in this tick


@dataclass
class Phase:
    mode: str
    name: str
    start: float
    end: float = 0.0
    decision_p99: float | None = None
    decision_p50: float | None = None
    reconcile_p99: float | None = None
    reaction_desired: list[float] = field(default_factory=list)
    reaction_ready: list[float] = field(default_factory=list)


class Sampler:
    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.ticks: list[Tick] = []
        self._audit_pos = 0

    def _audit_lines(self) -> list[str]:
        path = self.bench.audit_log
        if not path.exists():
            return []
        with path.open() as f:
            f.seek(self._audit_pos)
            data = f.read()
        complete = data[: data.rfind("\n") + 1]
        self._audit_pos += len(complete.encode())
        return complete.splitlines()

    def tick(self) -> None:
        now = time.monotonic()
        procs = {}
        for name, proc in self.bench.procs.items():
            if not proc.alive():
                continue
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{proc.pid}/stat").read_text()
                status = Path(f"/proc/{proc.pid}/status").read_text()
                procs[name.split("-")[0] if name.startswith("operator") else name] = parse_proc(
                    now, stat, status
                )
        polls = 0
        with contextlib.suppress(httpx.HTTPError, ValueError):
            polls = int(httpx.get(self.bench.standin_url("/stats"), timeout=2).json()["status"])
        self.ticks.append(Tick(now, procs, polls, count_audit(self._audit_lines(), OPERATOR_USER)))

    def run_for(self, seconds: float, every: float = 1.0, on_tick: Any = None) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.monotonic()
            self.tick()
            if on_tick is not None:
                on_tick()
            time.sleep(max(0.0, every - (time.monotonic() - started)))

    def window(self, start: float, end: float) -> list[Tick]:
        return [t for t in self.ticks if start <= t.at <= end]


def operator_metrics() -> str:
    return httpx.get(f"http://127.0.0.1:{OPERATOR_METRICS_PORT}/metrics", timeout=5).text


@dataclass
class Summary:
    mode: str
    phase: str
    seconds: float
    rss_mb_max: float
    cpu_pct: dict[str, float]
    api_rps: float
    status_writes_ps: float
    polls_ps: float
    decision_p50: float | None
    decision_p99: float | None
    reconcile_p99: float | None
    reaction_desired_max: float | None
    reaction_ready_max: float | None


def summarize(phase: Phase, ticks: list[Tick]) -> Summary:
    first, last = ticks[0], ticks[-1]
    span = last.at - first.at
    cpu = {
        name: cpu_percent(first.procs[name], last.procs[name]) for name in last.procs if name in first.procs
    }
    inner = ticks[1:]  # a tick's audit count covers the second before it
    return Summary(
        mode=phase.mode,
        phase=phase.name,
        seconds=span,
        rss_mb_max=max(t.procs["operator"].rss_bytes for t in ticks if "operator" in t.procs) / 2**20,
        cpu_pct=cpu,
        api_rps=sum(t.audit.requests for t in inner) / span,
        status_writes_ps=sum(t.audit.status_writes for t in inner) / span,
        polls_ps=(last.status_polls - first.status_polls) / span,
        decision_p50=phase.decision_p50,
        decision_p99=phase.decision_p99,
        reconcile_p99=phase.reconcile_p99,
        reaction_desired_max=max(phase.reaction_desired, default=None),
        reaction_ready_max=max(phase.reaction_ready, default=None),
    )


def measure(sampler: Sampler, phase: Phase, seconds: float, on_tick: Any = None) -> Phase:
    """Sample for `seconds`; the decision and reconcile quantiles from the operator's histograms."""
    labels = {"namespace": NAMESPACE}
    before = operator_metrics()
    sampler.run_for(seconds, on_tick=on_tick)
    after = operator_metrics()
    phase.end = time.monotonic()
    decision = bucket_delta(
        histogram_buckets(before, metric_names.OPERATOR_DECISION_SECONDS, labels),
        histogram_buckets(after, metric_names.OPERATOR_DECISION_SECONDS, labels),
    )
    reconcile = bucket_delta(
        histogram_buckets(before, metric_names.OPERATOR_RECONCILE_SECONDS, labels),
        histogram_buckets(after, metric_names.OPERATOR_RECONCILE_SECONDS, labels),
    )
    phase.decision_p50 = histogram_quantile(0.5, decision)
    phase.decision_p99 = histogram_quantile(0.99, decision)
    phase.reconcile_p99 = histogram_quantile(0.99, reconcile)
    return phase


def settle(bench: Bench, pools: int, per_pool: int, timeout: float, sampler: Sampler, proc: Proc) -> float:
    """Wait until every pool has exactly its floor of ready agents and says so in its status (the
    pools' statuses, not a list of 2,000 pods: that would load the API server we measure)."""

    def steady() -> bool:
        try:
            statuses = bench.pool_status()
        except httpx.HTTPError:
            return False  # an API server busy with 2,000 pods may answer late: not yet
        return len(statuses) == pools and all(
            s.get("ready") == s.get("replicas") == s.get("desiredReplicas") == per_pool
            for s in statuses.values()
        )

    started = time.monotonic()
    while not steady():
        if not proc.alive():
            raise BenchError(f"the operator exited; its log ends:\n{proc.tail()}")
        if time.monotonic() - started > timeout:
            raise BenchError(
                f"the pools did not settle at {per_pool} ready agents each within {timeout:.0f}s"
            )
        sampler.run_for(2.0)
    return time.monotonic() - started


def run_mode(
    bench: Bench, sampler: Sampler, mode: str, pools: int, per_pool: int, windows: float, last: bool
) -> list[Phase]:
    log(f"mode {mode}: starting the operator")
    proc = bench.operator(mode)
    bench.wait_for(
        "the operator's metrics",
        lambda: httpx.get(f"http://127.0.0.1:{OPERATOR_METRICS_PORT}/metrics").is_success,
        60,
        proc,
    )
    took = settle(bench, pools, per_pool, 600, sampler, proc)
    log(f"mode {mode}: {pools * per_pool} agents ready, every pool settled ({took:.0f}s)")
    sampler.run_for(5)
    steady = measure(sampler, Phase(mode, "steady", time.monotonic()), windows)

    raised = [pool_name(i) for i in range(min(10, pools))]
    log(f"mode {mode}: scale event: queue depth {SCALED_QUEUE_DEPTH} for {len(raised)} pools")
    target = per_pool + (SCALED_QUEUE_DEPTH - 50) // 10
    scale = Phase(mode, "scale event", time.monotonic())
    bench.set_queue({p: SCALED_QUEUE_DEPTH for p in raised})
    seen_desired: dict[str, float] = {}
    seen_ready: dict[str, float] = {}

    def follow() -> None:
        try:
            statuses = bench.pool_status()
        except httpx.HTTPError:
            return
        now = time.monotonic()
        for pool in raised:
            s = statuses.get(pool, {})
            if pool not in seen_desired and (s.get("desiredReplicas") or 0) >= target:
                seen_desired[pool] = now - scale.start
            if pool not in seen_ready and (s.get("ready") or 0) >= target:
                seen_ready[pool] = now - scale.start

    # Long enough for a scrape, a scaling interval and the pods' start, whatever --window says.
    measure(sampler, scale, max(windows, SCALE_WINDOW_S), on_tick=follow)
    scale.reaction_desired = list(seen_desired.values())
    scale.reaction_ready = list(seen_ready.values())
    if len(seen_ready) < len(raised):
        log(
            f"mode {mode}: only {len(seen_ready)} of {len(raised)} raised pools reached {target} ready agents"
        )
    bench.set_queue({p: 0 for p in raised})
    if not last:
        # The next mode starts from the floor: this operator scales the raised pools back in.
        log(f"mode {mode}: queues back to 0; waiting for the raised pools to drain back to {per_pool}")
        with contextlib.suppress(BenchError):
            settle(bench, pools, per_pool, 180, sampler, proc)
    proc.stop()
    return [steady, scale]


# ---- output ---------------------------------------------------------------------------------


def table(summaries: list[Summary]) -> str:
    header = [
        "mode / phase",
        "op RSS MB",
        "op CPU %",
        "API req/s",
        "status wr/s",
        "/status polls/s",
        "decision p50 s",
        "decision p99 s",
        "reconcile p99 s",
        "desired<- s max",
        "ready<- s max",
        "apiserver %",
        "etcd %",
        "kwok %",
        "prom %",
        "stand-in %",
    ]
    rows = [
        [
            f"{s.mode} / {s.phase}",
            fmt(s.rss_mb_max),
            fmt(s.cpu_pct.get("operator")),
            fmt(s.api_rps),
            fmt(s.status_writes_ps, 2),
            fmt(s.polls_ps, 0),
            fmt(s.decision_p50, 3),
            fmt(s.decision_p99, 3),
            fmt(s.reconcile_p99, 3),
            fmt(s.reaction_desired_max),
            fmt(s.reaction_ready_max),
            fmt(s.cpu_pct.get("kube-apiserver")),
            fmt(s.cpu_pct.get("etcd")),
            fmt(s.cpu_pct.get("kwok")),
            fmt(s.cpu_pct.get("prometheus")),
            fmt(s.cpu_pct.get("standin")),
        ]
        for s in summaries
    ]
    return render_table(header, rows)


def plot(sampler: Sampler, phases: list[Phase], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ticks = sampler.ticks
    t0 = ticks[0].at
    xs, cpu, rss, polls, api = [], [], [], [], []
    for prev, cur in itertools.pairwise(ticks):
        if "operator" not in cur.procs or "operator" not in prev.procs:
            continue
        if cur.procs["operator"].cpu_seconds < prev.procs["operator"].cpu_seconds:
            continue  # the next mode's operator process: no rate across the two
        span = cur.at - prev.at
        xs.append(cur.at - t0)
        cpu.append(cpu_percent(prev.procs["operator"], cur.procs["operator"]))
        rss.append(cur.procs["operator"].rss_bytes / 2**20)
        polls.append(max(0, cur.status_polls - prev.status_polls) / span)
        api.append(cur.audit.requests / span)
    fig, axes = plt.subplots(4, 1, figsize=(11, 10), sharex=True)
    for ax, ys, label in zip(
        axes,
        (cpu, rss, polls, api),
        ("operator CPU %", "operator RSS MB", "GET /status per s", "operator API requests per s"),
        strict=True,
    ):
        ax.plot(xs, ys, linewidth=0.8)
        ax.set_ylabel(label)
        for ph in phases:
            ax.axvspan(
                ph.start - t0,
                ph.end - t0,
                alpha=0.12,
                color="tab:orange" if "scale" in ph.name else "tab:green",
            )
    axes[1].axhline(150, color="red", linewidth=0.6, linestyle="--")
    for ph in phases:
        axes[0].text(ph.start - t0, axes[0].get_ylim()[1] * 0.9, f"{ph.mode}\n{ph.name}", fontsize=7)
    axes[-1].set_xlabel("seconds since the first operator started")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main -----------------------------------------------------------------------------------


def in_own_netns(argv: list[str]) -> None:
    """Re-execute under `unshare --net` once: a fresh network namespace with only loopback."""
    if os.environ.get(NETNS_MARK) == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    if os.geteuid() != 0:
        raise SystemExit("[scale] needs root: it runs in a network namespace of its own (unshare --net)")
    # Before the namespace: the build needs the Go module proxy; a cached kwok is reused.
    subprocess.run(["bash", str(REPO / "hack" / "build-kwok.sh")], check=True)
    env = {**os.environ, NETNS_MARK: "1"}
    child = subprocess.Popen(["unshare", "--net", "--", sys.executable, *argv], env=env)
    # Passed on, so that the run inside stops what it started (its `finally`) before it ends.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    sys.exit(child.wait())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="10 pools x 20 agents, 20 s windows: a smoke run"
    )
    parser.add_argument("--pools", type=int, default=None)
    parser.add_argument("--per-pool", type=int, default=20)
    parser.add_argument("--window", type=float, default=None, help="seconds per measured phase")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) at the end")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    in_own_netns([str(Path(__file__).resolve()), *sys.argv[1:]])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally`: stop what was started
    pools = args.pools or (10 if args.quick else 100)
    windows = args.window or (20.0 if args.quick else 60.0)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    tmp = Path(tempfile.mkdtemp(prefix="tars-scale-"))
    bench = Bench(args, tmp)
    started = time.monotonic()
    try:
        bench.control_plane()
        bench.kwok()
        bench.services()
        bench.objects(pools, args.per_pool)
        sampler = Sampler(bench)
        phases: list[Phase] = []
        for i, mode in enumerate(modes):
            phases += run_mode(bench, sampler, mode, pools, args.per_pool, windows, i == len(modes) - 1)
    except BenchError as exc:
        print(f"[scale] ERROR: {exc}", file=sys.stderr)
        sys.exit(1)
    finally:
        bench.stop_all()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    summaries = [summarize(ph, sampler.window(ph.start, ph.end)) for ph in phases]
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = (
        f"operator at scale: {pools} pools x {args.per_pool} agents on kwok; "
        f"{os.cpu_count()} cores (shared), {when}"
    )
    print()
    print(title)
    print(table(summaries))
    print(f"(total {time.monotonic() - started:.0f}s; targets: RSS <= 150 MB, decision p99 <= 1 s)")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(sampler, phases, args.out / "operator_scale.png", title)
    (args.out / "operator_scale.json").write_text(
        json.dumps(
            {
                "title": title,
                "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
                "pools": pools,
                "per_pool": args.per_pool,
                "summaries": [s.__dict__ for s in summaries],
                "reactions": {
                    f"{ph.mode}/{ph.name}": {"desired": ph.reaction_desired, "ready": ph.reaction_ready}
                    for ph in phases
                },
            },
            indent=2,
        )
    )
    log(f"wrote {args.out / 'operator_scale.png'} and operator_scale.json")


if __name__ == "__main__":
    main()
