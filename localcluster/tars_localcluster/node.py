"""The node's configuration files: containerd, the CNI network, the kubelet and kube-proxy.

Pure functions of the cluster configuration, so that a table test can check
each setting the node depends on. Every path points below the cluster's own
folder, so that `down` can remove all of it, and nothing listens beyond the
bridge address and loopback.
"""

from __future__ import annotations

import json
from typing import Any

from tars_localcluster.config import ClusterConfig

PAUSE_IMAGE = "localhost/tars/pause:3.10"
CNI_BIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins
RUNC = "/usr/sbin/runc"


def containerd_config(cfg: ClusterConfig) -> str:
    """containerd 2.4 (config version 4) with its own root, state and socket.

    `restrict_oom_score_adj`: root on these machines lacks CAP_SYS_RESOURCE, and without
    it runc cannot give the sandbox its oom_score_adj (every pod fails with "can't get
    final child's PID from pipe: EOF"). Network namespaces are kept under the state
    folder, so none is left in /run/netns.
    """
    d = cfg.containerd_dir
    return f"""\
version = 4
root = "{d / "root"}"
state = "{d / "state"}"
temp = "{d / "tmp"}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.nri.v1.nri",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[debug]
  level = "warn"

[plugins."io.containerd.server.v1.grpc"]
  address = "{cfg.containerd_socket}"

[plugins."io.containerd.server.v1.ttrpc"]
  address = "{cfg.containerd_socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d / "opt"}"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  # No registry here: every image is built and imported locally.
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{PAUSE_IMAGE}"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        Root = "{d / "state" / "runc"}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{cfg.cni_conf_dir}"
    max_conf_num = 1
"""


def cni_config(cfg: ClusterConfig) -> str:
    """A bridge network on the cluster's bridge, addresses from the pod CIDR.

    No IP masquerade: nothing from a pod is translated towards other networks (and
    the forward filter of `hostnet` drops it).
    """
    conf: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "tars",
        "plugins": [
            {
                "type": "bridge",
                "bridge": cfg.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": cfg.pod_cidr, "gateway": cfg.gateway_ip}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(cfg.cni_ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    return json.dumps(conf, indent=2) + "\n"


def kubelet_config(cfg: ClusterConfig) -> dict[str, Any]:
    """The KubeletConfiguration. cgroup v1 hosts need `failCgroupV1: false` (v1.37 refuses
    them by default, KEP-5573); image garbage collection is off because images cannot be
    pulled again here; eviction only on real exhaustion (the machine is shared)."""
    pki = cfg.pki_dir
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": cfg.gateway_ip,
        "port": cfg.kubelet_port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": cfg.kubelet_healthz_port,
        "tlsCertFile": str(pki / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{cfg.containerd_socket}",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{cfg.cgroup_parent}",
        "failCgroupV1": False,
        "failSwapOn": False,
        "clusterDNS": [cfg.cluster_dns_ip],
        "clusterDomain": cfg.cluster_domain,
        # Pods with dnsPolicy Default get no resolver of the host's: nothing leaves the machine.
        "resolvConf": "",
        "podLogsDir": str(cfg.pod_logs_dir),
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "serializeImagePulls": False,
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "protectKernelDefaults": False,
        "shutdownGracePeriod": "0s",
        "maxPods": 250,
    }


def kube_proxy_config(cfg: ClusterConfig) -> dict[str, Any]:
    """kube-proxy in nftables mode. The kernel has no br_netfilter, so a reply from a pod
    to another pod on the same bridge would bypass the un-DNAT: masqueradeAll routes
    every Service connection through the host. Conntrack sysctls are left alone."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "nftables",
        "clientConnection": {"kubeconfig": str(cfg.kubeconfig_for("kube-proxy"))},
        "hostnameOverride": cfg.node_name,
        "clusterCIDR": cfg.pod_cidr,
        "healthzBindAddress": f"127.0.0.1:{cfg.kube_proxy_healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{cfg.kube_proxy_metrics_port}",
        "nodePortAddresses": [f"{cfg.gateway_ip}/32"],
        "nftables": {"masqueradeAll": True},
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }
