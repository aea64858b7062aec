"""Where the local cluster keeps its files, which ports and addresses it uses.

Everything lives in a cache folder outside the repository (``TARS_CACHE``,
default ``~/.cache/tars-operator``), so a clean clone reuses earlier builds.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

LOCALCLUSTER_DIR = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    explicit = os.environ.get("TARS_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tars-operator"


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
    services (6443, 2379, 9090, 6379) so a developer's own servers do not clash."""

    root: Path
    node_name: str = "tars-node-0"
    # The bridge's address is the pods' gateway and the one address on which the
    # host offers cluster services (API server, Redis, Prometheus) to pods.
    bridge: str = "tars0"
    pod_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/16"
    apiserver_port: int = 16443
    etcd_client_port: int = 12379
    etcd_peer_port: int = 12380
    controller_manager_port: int = 10257
    scheduler_port: int = 10259
    redis_port: int = 16379
    prometheus_port: int = 19090
    mock_llm_port: int = 18000
    operator_metrics_port: int = 19100
    operator_health_port: int = 18081
    node_agent_health_port: int = 10248
    netns_prefix: str = "tars-"

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
    def apiserver_url(self) -> str:
        return f"https://{self.gateway_ip}:{self.apiserver_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.gateway_ip}:{self.redis_port}/0"

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.gateway_ip}:{self.prometheus_port}"

    @property
    def llm_base_url(self) -> str:
        return f"http://{self.gateway_ip}:{self.mock_llm_port}/v1"

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
    def scrape_targets_dir(self) -> Path:
        return self.root / "scrape-targets"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    def kubeconfig_for(self, component: str) -> Path:
        return self.root / f"{component}.kubeconfig"

    @property
    def cgroup_root(self) -> Path:
        return Path("/sys/fs/cgroup/memory") / "tars-localcluster"

    @property
    def bin_dir(self) -> Path:
        return cache_dir() / "bin"
