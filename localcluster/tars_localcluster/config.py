"""Where the local cluster keeps its files, which ports and addresses it uses.

Everything lives in a cache folder outside the repository (``TARS_CACHE``,
default ``~/.cache/tars-operator``), so a clean clone reuses earlier builds.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

LOCALCLUSTER_DIR = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    explicit = os.environ.get("TARS_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tars-operator"


def cached_tool(name: str, override: str | None = None) -> str | None:
    """A tool `make cluster-build` builds (helm, promtool, ...): `override` (a path from the
    environment) when given, else the cache's copy, else one on PATH; None when there is none."""
    for candidate in (override, str(cache_dir() / "bin" / name), shutil.which(name)):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def read_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for line in (LOCALCLUSTER_DIR / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            versions[key] = value
    return versions


@dataclass(frozen=True)
class ClusterConfig:
    """One local cluster. The defaults avoid the well-known ports of the same
    services (6443, 2379, 10250, 10248) so a developer's own servers do not clash."""

    root: Path
    node_name: str = "tars-node-0"
    # The bridge's address is the pods' gateway, the node's InternalIP and the one
    # address on which the host offers its services (the API server, the kubelet) to pods.
    bridge: str = "tars0"
    pod_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/16"
    cluster_dns_ip: str = "10.96.0.10"
    cluster_domain: str = "cluster.local"
    apiserver_port: int = 16443
    etcd_client_port: int = 12379
    etcd_peer_port: int = 12380
    controller_manager_port: int = 10257
    scheduler_port: int = 10259
    kubelet_port: int = 20250
    kubelet_healthz_port: int = 20248
    kube_proxy_healthz_port: int = 20256
    kube_proxy_metrics_port: int = 20249
    # The one nftables table of our own (pod traffic stays on the bridge); kube-proxy keeps its own.
    nft_table: str = "tars-localcluster"

    @classmethod
    def default(cls) -> ClusterConfig:
        return cls(root=cache_dir() / "cluster")

    @property
    def gateway_ip(self) -> str:
        return str(next(ipaddress.ip_network(self.pod_cidr).hosts()))

    @property
    def pod_prefix_len(self) -> int:
        return ipaddress.ip_network(self.pod_cidr).prefixlen

    @property
    def kubernetes_service_ip(self) -> str:
        return str(next(ipaddress.ip_network(self.service_cidr).hosts()))

    @property
    def apiserver_url(self) -> str:
        return f"https://{self.gateway_ip}:{self.apiserver_port}"

    @property
    def pki_dir(self) -> Path:
        return self.root / "pki"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    def kubeconfig_for(self, component: str) -> Path:
        return self.root / f"{component}.kubeconfig"

    # ---- the node: containerd, CNI, kubelet -----------------------------
    @property
    def containerd_dir(self) -> Path:
        return self.root / "containerd"

    @property
    def containerd_socket(self) -> Path:
        return self.run_dir / "containerd.sock"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.root / "cni" / "ipam"

    @property
    def kubelet_dir(self) -> Path:
        return self.root / "kubelet"

    @property
    def pod_logs_dir(self) -> Path:
        return self.root / "pod-logs"

    @property
    def cgroup_parent(self) -> str:
        """The kubelet's cgroupRoot: every pod lives below it, in every v1 hierarchy."""
        return "tars-localcluster"

    @property
    def system_cgroup(self) -> str:
        """The node's daemons' CPU cgroup, beside the pods' parent (a systemd node's system.slice)."""
        return "tars-localcluster-system"

    @property
    def bin_dir(self) -> Path:
        return cache_dir() / "bin"
