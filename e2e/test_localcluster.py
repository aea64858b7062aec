"""The local cluster behaves like a real one: real kube-apiserver, controller-
manager and scheduler, and our node agent running pods as local processes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from e2e.harness import (
    PROGRAMS,
    PYTHON,
    Kube,
    container_status,
    eventually,
    is_ready,
    pod,
)
from tars_localcluster.cluster import Cluster
from tars_localcluster.config import read_versions
from tars_localcluster.procs import pid_alive

WEB = [PYTHON, str(PROGRAMS / "web.py")]


def ready_probe(period: int = 1) -> dict[str, object]:
    return {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": period, "failureThreshold": 1}


def fetch(url: str) -> httpx.Response:
    return httpx.get(url, timeout=3)


def wait_ready(kube: Kube, namespace: str, name: str, timeout: float = 60) -> dict[str, Any]:
    def ready_pod() -> dict[str, Any] | None:
        p = kube.get("pod", name, namespace)
        return p if is_ready(p) else None

    return eventually(ready_pod, timeout, f"pod {name} Ready")


def test_server_reports_the_pinned_version(kube: Kube) -> None:
    version = json.loads(kube.run("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == read_versions()["KUBERNETES_VERSION"]


def test_node_is_ready_and_keeps_its_lease(kube: Kube, cluster: Cluster) -> None:
    node = kube.get("node", cluster.cfg.node_name)
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True"
    assert int(node["status"]["allocatable"]["pods"]) > 0
    first = kube.get("lease", cluster.cfg.node_name, "kube-node-lease")["spec"]["renewTime"]
    eventually(
        lambda: kube.get("lease", cluster.cfg.node_name, "kube-node-lease")["spec"]["renewTime"] != first,
        30,
        "the node lease to be renewed",
    )


def test_deployment_and_pod_become_running_and_ready(kube: Kube, namespace: str) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": pod("web", WEB, container={"readinessProbe": ready_probe()}),
        },
    }
    deployment["spec"]["template"].pop("apiVersion")
    deployment["spec"]["template"].pop("kind")
    deployment["spec"]["template"]["metadata"].pop("name")
    kube.apply(
        deployment, pod("single", WEB, container={"readinessProbe": ready_probe()}), namespace=namespace
    )

    def all_ready() -> list[dict[str, Any]] | None:
        pods = kube.pods(namespace)
        return pods if len(pods) == 3 and all(is_ready(p) for p in pods) else None

    pods = eventually(all_ready, 90, "2 Deployment pods and 1 Pod Running and Ready")
    for p in pods:
        assert p["spec"]["nodeName"], "the scheduler bound the pod"
        assert p["status"]["podIP"].startswith("10.244.")
        # The process behind the pod answers at the pod's own IP with its own name.
        info = fetch(f"http://{p['status']['podIP']}:8080/").json()
        assert info == {"pod": p["metadata"]["name"], "ip": p["status"]["podIP"], "port": 8080}
    deploy = kube.get("deployment", "web", namespace)
    assert deploy["status"].get("readyReplicas") == 2


def test_readiness_probe_gates_ready(kube: Kube, namespace: str, tmp_path: Path) -> None:
    ready_file = tmp_path / "ready"
    manifest = pod("gated", WEB, container={"readinessProbe": ready_probe()})
    manifest["spec"]["containers"][0]["env"].append({"name": "READY_FILE", "value": str(ready_file)})
    kube.apply(manifest, namespace=namespace)

    def failing_probe_seen() -> bool:
        events = kube.get("events", namespace=namespace)["items"]
        return any(e["reason"] == "Unhealthy" and e["involvedObject"]["name"] == "gated" for e in events)

    eventually(failing_probe_seen, 60, "a failed readiness probe")
    p = kube.get("pod", "gated", namespace)
    assert p["status"]["phase"] == "Running"
    assert not is_ready(p)
    assert container_status(p)["ready"] is False

    ready_file.touch()
    wait_ready(kube, namespace, "gated", 30)


def test_two_pods_listen_on_the_same_port(kube: Kube, namespace: str) -> None:
    kube.apply(pod("twin-a", WEB), pod("twin-b", WEB), namespace=namespace)
    a = wait_ready(kube, namespace, "twin-a")
    b = wait_ready(kube, namespace, "twin-b")
    ip_a, ip_b = a["status"]["podIP"], b["status"]["podIP"]
    assert ip_a != ip_b
    assert eventually(lambda: fetch(f"http://{ip_a}:8080/").json()["pod"] == "twin-a", 20, "twin-a answering")
    assert eventually(lambda: fetch(f"http://{ip_b}:8080/").json()["pod"] == "twin-b", 20, "twin-b answering")


def test_pods_reach_cluster_services_and_prometheus_scrapes_them(
    kube: Kube, namespace: str, cluster: Cluster
) -> None:
    cfg = cluster.cfg
    pinger = pod("pinger", [PYTHON, str(PROGRAMS / "redis_ping.py")])
    pinger["spec"]["containers"][0]["env"] += [
        {"name": "REDIS_HOST", "value": cfg.gateway_ip},
        {"name": "REDIS_PORT", "value": str(cfg.redis_port)},
    ]
    scraped = pod("scraped", WEB)
    scraped["metadata"]["annotations"] = {"prometheus.io/scrape": "true", "prometheus.io/port": "8080"}
    kube.apply(pinger, scraped, namespace=namespace)

    pinger_ip = wait_ready(kube, namespace, "pinger")["status"]["podIP"]
    client = redis.Redis(host="127.0.0.1", port=cfg.redis_port)
    stored = eventually(lambda: client.get("e2e:pinger"), 30, "the pod's write to Redis")
    assert stored.decode() == pinger_ip

    def scraped_value() -> str | None:
        resp = httpx.get(
            f"{cfg.prometheus_url}/api/v1/query",
            params={"query": f'e2e_web_up{{pod="scraped",namespace="{namespace}"}}'},
        )
        result = resp.json()["data"]["result"]
        return result[0]["value"][1] if result else None

    assert eventually(scraped_value, 60, "Prometheus to scrape the pod at its pod IP") == "1"


def _started_pid(marker: Path) -> int:
    text = marker.read_text() if marker.exists() else ""
    return int(text.split()[1]) if text.startswith("started") else 0


def test_delete_sends_sigterm_and_a_clean_exit_ends_early(kube: Kube, namespace: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    kube.apply(
        pod(
            "graceful",
            [PYTHON, str(PROGRAMS / "term.py"), "handle", str(marker)],
            terminationGracePeriodSeconds=20,
        ),
        namespace=namespace,
    )
    wait_ready(kube, namespace, "graceful")
    pid = eventually(lambda: _started_pid(marker), 20, "the process to start")
    started = time.monotonic()
    kube.run("delete", "pod", "graceful", "-n", namespace, "--wait=false")
    eventually(lambda: not kube.exists("pod", "graceful", namespace), 30, "the pod object to be removed")
    took = time.monotonic() - started
    assert "clean-exit" in marker.read_text()
    assert not pid_alive(pid)
    assert took < 15, (
        f"a process that exits on SIGTERM should not wait out the 20s grace period ({took:.1f}s)"
    )


def test_delete_kills_a_process_that_ignores_sigterm_after_the_grace_period(
    kube: Kube, namespace: str, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    grace = 4
    kube.apply(
        pod(
            "stubborn",
            [PYTHON, str(PROGRAMS / "term.py"), "ignore", str(marker)],
            terminationGracePeriodSeconds=grace,
        ),
        namespace=namespace,
    )
    wait_ready(kube, namespace, "stubborn")
    pid = eventually(lambda: _started_pid(marker), 20, "the process to start")
    started = time.monotonic()
    kube.run("delete", "pod", "stubborn", "-n", namespace, "--wait=false")
    eventually(lambda: "ignored" in marker.read_text(), 10, "SIGTERM to reach the process")
    assert pid_alive(pid), "the process must get its grace period"
    eventually(lambda: not kube.exists("pod", "stubborn", namespace), 30, "the pod object to be removed")
    took = time.monotonic() - started
    assert not pid_alive(pid)
    assert took >= grace - 0.5, f"killed after {took:.1f}s, before the {grace}s grace period ended"


def _memhog(name: str, restart_policy: str) -> dict[str, object]:
    return pod(
        name,
        [PYTHON, str(PROGRAMS / "memhog.py"), "8"],
        restartPolicy=restart_policy,
        container={"resources": {"limits": {"memory": "64Mi"}}},
    )


def test_memory_limit_is_enforced_oomkilled_and_restarted(kube: Kube, namespace: str) -> None:
    kube.apply(_memhog("hog-always", "Always"), _memhog("hog-never", "Never"), namespace=namespace)

    def restarted_after_oom() -> dict[str, object] | None:
        status = container_status(kube.get("pod", "hog-always", namespace))
        last = status.get("lastState", {}).get("terminated", {})
        return status if status.get("restartCount", 0) >= 1 and last.get("reason") == "OOMKilled" else None

    status = eventually(restarted_after_oom, 90, "hog-always to be OOMKilled and restarted")
    assert status["lastState"]["terminated"]["exitCode"] == 137

    def failed() -> dict[str, object] | None:
        p = kube.get("pod", "hog-never", namespace)
        return p if p["status"].get("phase") == "Failed" else None

    never = eventually(failed, 60, "hog-never to fail")
    state = container_status(never)["state"]["terminated"]
    assert state["reason"] == "OOMKilled"
    assert container_status(never)["restartCount"] == 0


def test_deleting_a_deployment_garbage_collects_replicaset_and_pods(kube: Kube, namespace: str) -> None:
    template = pod("gc", WEB)
    template.pop("apiVersion")
    template.pop("kind")
    template["metadata"].pop("name")
    kube.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "gc"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "gc"}}, "template": template},
        },
        namespace=namespace,
    )
    eventually(
        lambda: len([p for p in kube.pods(namespace, "app=gc") if is_ready(p)]) == 2, 90, "2 ready pods"
    )
    rs = kube.get("replicasets", namespace=namespace)["items"]
    assert len(rs) == 1 and rs[0]["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
    kube.run("delete", "deployment", "gc", "-n", namespace, "--cascade=background", "--wait=false")
    eventually(
        lambda: not kube.get("replicasets", namespace=namespace)["items"],
        60,
        "the ReplicaSet to be collected",
    )
    eventually(lambda: not kube.pods(namespace, "app=gc"), 60, "the pods to be collected")


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
