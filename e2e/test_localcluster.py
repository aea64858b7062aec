"""The local cluster is a real one: upstream kube-apiserver, controller-manager, scheduler,
kubelet, kube-proxy, containerd with runc and CNI bridge networking, CoreDNS, and the
Prometheus that prometheus-operator runs; pods run from our own images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from e2e.harness import Kube, Prometheus, eventually, is_ready, pod
from tars_localcluster import cgroups
from tars_localcluster.cluster import Cluster
from tars_localcluster.config import read_versions

pytestmark = pytest.mark.localcluster


def http_port(**probe: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"ports": [{"name": "http", "containerPort": 8080}]}
    if probe:
        fields["readinessProbe"] = {"httpGet": {"path": "/ready", "port": 8080}, **probe}
    return fields


def wait_ready(kube: Kube, namespace: str, name: str, timeout: float = 60) -> dict[str, Any]:
    def ready_pod() -> dict[str, Any] | None:
        p = kube.get("pod", name, namespace)
        return p if is_ready(p) else None

    return eventually(ready_pod, timeout, f"pod {name} Ready")


def exec_in(kube: Kube, namespace: str, pod_name: str, *command: str, check: bool = True) -> str:
    proc = kube.run("exec", pod_name, "-n", namespace, "--", *command, check=check)
    return proc.stdout + proc.stderr


def test_server_and_node_report_the_pinned_versions(kube: Kube, cluster: Cluster) -> None:
    versions = read_versions()
    server = json.loads(kube.run("version", "-o", "json").stdout)["serverVersion"]
    assert server["gitVersion"] == versions["KUBERNETES_VERSION"]
    node = kube.get("node", cluster.cfg.node_name)
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == versions["KUBERNETES_VERSION"]
    assert info["kubeProxyVersion"] in ("", versions["KUBERNETES_VERSION"])
    assert info["containerRuntimeVersion"] == f"containerd://{versions['CONTAINERD_VERSION'].lstrip('v')}"
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True"
    first = kube.get("lease", cluster.cfg.node_name, "kube-node-lease")["spec"]["renewTime"]
    eventually(
        lambda: kube.get("lease", cluster.cfg.node_name, "kube-node-lease")["spec"]["renewTime"] != first,
        30,
        "the kubelet to renew its node lease",
    )


def test_pods_run_from_our_image_as_non_root_on_a_read_only_root(kube: Kube, namespace: str) -> None:
    template = pod("web", "web.py", **http_port(periodSeconds=1))
    template.pop("apiVersion"), template.pop("kind"), template["metadata"].pop("name")
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}, "template": template},
    }
    kube.apply(deployment, namespace=namespace)
    kube.run("rollout", "status", "deployment/web", "-n", namespace, "--timeout=90s")
    pods = kube.pods(namespace, "app=web")
    assert len(pods) == 2 and all(is_ready(p) for p in pods)
    for p in pods:
        name, ip = p["metadata"]["name"], p["status"]["podIP"]
        assert ip.startswith("10.244.")
        # The program answers at its own pod (through the API server's proxy) with its own name.
        info = json.loads(kube.pod_get(namespace, name, 8080, "/"))
        assert info == {"pod": name, "ip": ip, "port": 8080}
    name = pods[0]["metadata"]["name"]
    assert exec_in(kube, namespace, name, "id", "-u").strip() == "10001"
    denied = exec_in(kube, namespace, name, "touch", "/written", check=False)
    assert "Read-only file system" in denied
    assert "serving on 8080" in kube.run("logs", name, "-n", namespace).stdout


def test_readiness_probe_gates_ready(kube: Kube, namespace: str) -> None:
    manifest = pod("gated", "web.py", **http_port(periodSeconds=1, failureThreshold=1))
    manifest["spec"]["containers"][0]["env"].append({"name": "READY_FILE", "value": "/tmp/ready"})
    kube.apply(manifest, namespace=namespace)

    def failing_probe_seen() -> bool:
        events = kube.get("events", namespace=namespace)["items"]
        return any(e["reason"] == "Unhealthy" and e["involvedObject"]["name"] == "gated" for e in events)

    eventually(failing_probe_seen, 60, "a failed readiness probe")
    p = kube.get("pod", "gated", namespace)
    assert p["status"]["phase"] == "Running" and not is_ready(p)
    exec_in(kube, namespace, "gated", "touch", "/tmp/ready")
    wait_ready(kube, namespace, "gated", 30)


FETCH = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())"
RESOLVE = "import socket, sys; print(socket.gethostbyname(sys.argv[1]))"


def test_services_resolve_by_name_and_route_to_every_backend(kube: Kube, namespace: str) -> None:
    kube.apply(
        pod("backend-a", "web.py", labels={"app": "backend"}, **http_port()),
        pod("backend-b", "web.py", labels={"app": "backend"}, **http_port()),
        pod("client", "web.py", **http_port()),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "backend"},
            "spec": {"selector": {"app": "backend"}, "ports": [{"port": 80, "targetPort": "http"}]},
        },
        namespace=namespace,
    )
    for name in ("backend-a", "backend-b", "client"):
        wait_ready(kube, namespace, name)
    service_ip = kube.get("service", "backend", namespace)["spec"]["clusterIP"]
    # CoreDNS answers for Services (short and full names) and the API server's Service.
    fqdn = f"backend.{namespace}.svc.cluster.local"
    assert exec_in(kube, namespace, "client", "python", "-c", RESOLVE, fqdn).strip() == service_ip
    kubernetes_ip = kube.get("service", "kubernetes", "default")["spec"]["clusterIP"]
    resolved = exec_in(kube, namespace, "client", "python", "-c", RESOLVE, "kubernetes.default")
    assert resolved.strip() == kubernetes_ip
    # kube-proxy spreads connections to the ClusterIP over both pods.
    seen: set[str] = set()

    def both_backends() -> bool:
        out = exec_in(kube, namespace, "client", "python", "-c", FETCH, "http://backend/")
        seen.add(json.loads(out)["pod"])
        return seen == {"backend-a", "backend-b"}

    eventually(both_backends, 60, "answers from both backends through the Service", interval=0)
    # Names beyond the cluster do not resolve: nothing is forwarded off this machine.
    outside = exec_in(kube, namespace, "client", "python", "-c", RESOLVE, "example.com", check=False)
    assert "gaierror" in outside


def test_prometheus_discovers_pods_through_a_pod_monitor(
    kube: Kube, namespace: str, prometheus: Prometheus
) -> None:
    kube.apply(
        pod("scraped", "web.py", **http_port()),
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": {"name": "scraped"},
            "spec": {
                "selector": {"matchLabels": {"app": "scraped"}},
                "podMetricsEndpoints": [{"port": "http", "path": "/metrics", "interval": "2s"}],
            },
        },
        namespace=namespace,
    )
    wait_ready(kube, namespace, "scraped")

    def scraped_value() -> str | None:
        result = prometheus.query(f'e2e_web_up{{pod="scraped",namespace="{namespace}"}}')
        return str(result[0]["value"][1]) if result else None

    assert eventually(scraped_value, 90, "Prometheus to discover and scrape the pod") == "1"


def test_pod_security_admission_enforces_the_restricted_level(kube: Kube, namespace: str) -> None:
    root = pod("as-root", "web.py")
    root["spec"]["containers"][0]["securityContext"] = {"runAsUser": 0, "allowPrivilegeEscalation": True}
    refused = kube.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(root), check=False)
    assert refused.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in refused.stderr, refused.stderr
    assert "runAsNonRoot" in refused.stderr and "allowPrivilegeEscalation" in refused.stderr


def test_rbac_denies_a_service_account_what_its_role_does_not_grant(
    kube: Kube, namespace: str, cluster: Cluster, tmp_path: Path
) -> None:
    kube.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
        namespace=namespace,
    )
    token = kube.run("create", "token", "reader", "-n", namespace).stdout.strip()
    # A kubeconfig with only the token: the admin's client certificate would win otherwise.
    sa_config = tmp_path / "kubeconfig"
    sa_config.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "sa",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": cluster.cfg.apiserver_url,
                            "certificate-authority": str(cluster.pki.ca_cert),
                        },
                    }
                ],
                "users": [{"name": "sa", "user": {"token": token}}],
                "contexts": [
                    {"name": "sa", "context": {"cluster": "c", "user": "sa", "namespace": namespace}}
                ],
            }
        )
    )
    as_sa = Kube(sa_config, kube.kubectl_bin)
    assert as_sa.run("get", "pods", "-n", namespace).returncode == 0
    for args in (
        ("get", "secrets", "-n", namespace),
        ("get", "pods", "-n", "kube-system"),
        ("delete", "pod", "anything", "-n", namespace),
    ):
        denied = as_sa.run(*args, check=False)
        assert denied.returncode != 0
        assert "forbidden" in denied.stderr.lower(), denied.stderr


def test_cluster_up_again_keeps_the_running_cluster(cluster: Cluster) -> None:
    before = cluster.status()
    cluster.up(build=False)
    assert cluster.status() == before
    assert cluster.is_up()


def test_the_pods_parent_weighs_what_the_kubelet_gives_the_pods(cluster: Cluster) -> None:
    """The kubelet weighs kubepods by the node's CPUs (cpu.shares 2048 on 2 cores); on a systemd
    node kubepods.slice sits at the root with that weight, beside system.slice's 1024. Below a
    parent of the default weight (1024), the pods together weighed only as much as the node's
    daemons: each pod start in a 300-task burst took the running agents' CPU."""
    checked = 0
    for root in cgroups.cpu_hierarchies():
        parent = root / cluster.cfg.cgroup_parent
        knob = "cpu.shares" if (parent / "cpu.shares").exists() else "cpu.weight"
        kubepods = (parent / "kubepods" / knob).read_text().strip()
        assert (parent / knob).read_text().strip() == kubepods, f"{parent / knob} is not kubepods' {kubepods}"
        checked += 1
    assert checked, "no CPU hierarchy found"


def test_the_nodes_daemons_share_one_cpu_cgroup_beside_the_pods(cluster: Cluster) -> None:
    """As on a systemd node (system.slice beside kubepods): left in the root CPU cgroup, every
    daemon weighed as much as all pods together, and a pod start (API server, etcd, kubelet,
    containerd busy at once) took the agents' CPU: a 300-task burst's pickup p50 was 1.07 s, and
    0.50 s with the daemons moved (one run each, bench/README.md warm_pickup)."""
    group = f"/{cluster.cfg.system_cgroup}"
    for name, pid in cluster.status().items():
        assert pid is not None, f"{name} is not running"
        lines = [line.split(":", 2) for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
        # the v1 cpu hierarchy's line, or the unified one's on a host without v1 controllers
        cpu = [path for _, controllers, path in lines if "cpu" in controllers.split(",")]
        cpu = cpu or [path for number, _, path in lines if number == "0"]
        assert cpu == [group], f"{name} (pid {pid}) is in CPU cgroup {cpu}, not {group}"
