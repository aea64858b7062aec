"""The node's configuration: every setting the node depends on here, and every path below the
cluster's own folder (so that `down` can remove it)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tars_localcluster import hostnet, node
from tars_localcluster.cluster import pod_security_config
from tars_localcluster.config import ClusterConfig


@pytest.fixture
def cfg(tmp_path: Path) -> ClusterConfig:
    return ClusterConfig(root=tmp_path / "cluster")


def paths_in(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in paths_in(v)]
    if isinstance(value, list):
        return [p for v in value for p in paths_in(v)]
    if isinstance(value, str) and value.startswith("/"):
        return [value]
    if isinstance(value, str) and value.startswith("unix:///"):
        return [value.removeprefix("unix://")]
    return []


def test_containerd_has_its_own_folders_and_the_settings_this_machine_needs(cfg: ClusterConfig) -> None:
    config = tomllib.loads(node.containerd_config(cfg))
    assert config["version"] == 4
    owned = [p for p in paths_in(config) if p not in (node.RUNC, node.CNI_BIN_DIR)]
    assert owned and all(p.startswith(str(cfg.root)) for p in owned), owned
    runtime = config["plugins"]["io.containerd.cri.v1.runtime"]
    # Without it every sandbox fails: root here cannot set oom_score_adj -998.
    assert runtime["restrict_oom_score_adj"] is True
    assert runtime["netns_mounts_under_state_dir"] is True
    runc = runtime["containerd"]["runtimes"]["runc"]
    assert runc["options"]["SystemdCgroup"] is False  # the kubelet's cgroupfs driver
    images = config["plugins"]["io.containerd.cri.v1.images"]
    assert images["pinned_images"]["sandbox"] == node.PAUSE_IMAGE
    assert "io.containerd.nri.v1.nri" in config["disabled_plugins"]
    assert config["plugins"]["io.containerd.grpc.v1.cri"]["stream_server_address"] == "127.0.0.1"


def test_the_pod_network_is_the_bridge_without_masquerade(cfg: ClusterConfig) -> None:
    conf = json.loads(node.cni_config(cfg))
    bridge = conf["plugins"][0]
    assert bridge["bridge"] == cfg.bridge and bridge["isGateway"] is True
    assert bridge["ipMasq"] is False
    (subnet,) = bridge["ipam"]["ranges"][0]
    assert subnet == {"subnet": cfg.pod_cidr, "gateway": cfg.gateway_ip}
    assert bridge["ipam"]["dataDir"].startswith(str(cfg.root))


def test_kubelet_listens_on_the_bridge_and_keeps_its_state_in_the_cluster_folder(cfg: ClusterConfig) -> None:
    config = node.kubelet_config(cfg)
    assert config["address"] == cfg.gateway_ip and config["healthzBindAddress"] == "127.0.0.1"
    assert config["readOnlyPort"] == 0
    assert config["authentication"]["anonymous"]["enabled"] is False
    assert config["authorization"]["mode"] == "Webhook"
    assert config["failCgroupV1"] is False and config["cgroupDriver"] == "cgroupfs"
    assert config["cgroupRoot"] == f"/{cfg.cgroup_parent}"
    assert config["clusterDNS"] == [cfg.cluster_dns_ip]
    assert config["resolvConf"] == "", "no resolver of the host's: nothing leaves the machine"
    assert config["imageGCHighThresholdPercent"] == 100, "images cannot be pulled again here"
    files = paths_in({k: v for k, v in config.items() if k != "cgroupRoot"})
    assert files and all(p.startswith(str(cfg.root)) for p in files), files


def test_kube_proxy_masquerades_service_traffic_and_leaves_conntrack_alone(cfg: ClusterConfig) -> None:
    config = node.kube_proxy_config(cfg)
    assert config["mode"] == "nftables"
    assert config["nftables"]["masqueradeAll"] is True  # no br_netfilter in this kernel
    assert config["conntrack"]["maxPerCore"] == 0
    assert config["nodePortAddresses"] == [f"{cfg.gateway_ip}/32"]
    assert config["healthzBindAddress"].startswith("127.0.0.1:")


def test_forwarded_traffic_never_leaves_the_bridge() -> None:
    script = hostnet.forward_filter("tars-localcluster", "tars0")
    rules = [line.strip() for line in script.splitlines() if "drop" in line or "accept" in line]
    assert rules[1] == 'iifname "tars0" oifname "tars0" accept'
    assert rules[2].startswith('iifname "tars0" counter drop')
    assert rules[3].startswith('oifname "tars0" counter drop')


def test_pod_security_enforces_restricted_everywhere_but_kube_system() -> None:
    (plugin,) = pod_security_config()["plugins"]  # type: ignore[index]
    defaults = plugin["configuration"]["defaults"]
    assert defaults["enforce"] == defaults["audit"] == defaults["warn"] == "restricted"
    assert plugin["configuration"]["exemptions"]["namespaces"] == ["kube-system"]
