"""The Helm chart against the real API server: every object passes server-side validation, and
the operator's ServiceAccount can do exactly what the operator does, nothing more (the
ServiceAccount and RBAC objects are applied for real and probed with `kubectl auth can-i`).

The operator running from the chart is the subject of test_operator.py and test_chart_in_cluster.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.harness import Kube, eventually, temporary_namespace, unique
from e2e.operator_calls import operator_calls
from e2e.operator_env import Helm, find_helm

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "tars-operator"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
# The cluster runs the Prometheus Operator: its ServiceMonitor/PodMonitor/PrometheusRule validate too.
MONITORING = {
    "serviceMonitor": {"enabled": True},
    "podMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
}


@pytest.fixture(scope="module")
def helm(kube: Kube) -> Helm:
    # `kubectl auth can-i` answers "no" for a resource the server does not know: install the CRD.
    kube.run("apply", "--server-side", "-f", str(REPO / "crds"))
    kube.run("wait", "--for=condition=Established", "crd/agentpools.tars.dev", "--timeout=30s")
    return Helm(find_helm(), kube)


def template(helm: Helm, release: str, namespace: str, values: dict[str, Any], *extra: str) -> str:
    """`helm template` for the running server's version, with `values` as a values file."""
    version = server_version(helm.kube)
    return helm.run(
        "template",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--kube-version",
        version,
        *extra,
        values=values,
    )


def server_version(kube: Kube) -> str:
    info = json.loads(kube.run("version", "-o", "json").stdout)["serverVersion"]
    return str(info["gitVersion"]).lstrip("v").split("-")[0]


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture
def release_namespace(kube: Kube) -> Iterator[str]:
    with temporary_namespace(kube, "helm") as name:
        yield name


@pytest.fixture
def watched_namespace(kube: Kube) -> Iterator[str]:
    with temporary_namespace(kube, "helm-apps") as name:
        yield name


@pytest.fixture
def applied(kube: Kube) -> Iterator[list[dict[str, Any]]]:
    """Objects a test applied for real; deleted afterwards (cluster-scoped ones too)."""
    objs: list[dict[str, Any]] = []
    yield objs
    if objs:
        kube.run(
            "delete",
            "--ignore-not-found",
            "--wait=false",
            "-f",
            "-",
            stdin=yaml.safe_dump_all(objs),
            check=False,
        )


def test_every_object_passes_server_side_validation(
    helm: Helm, kube: Kube, release_namespace: str, watched_namespace: str
) -> None:
    values: dict[str, Any] = {
        **MONITORING,
        "watchNamespaces": [watched_namespace],
        "dashboard": {"enabled": True},
        "redis": {
            "enabled": True,
            "persistence": {"enabled": True},
            "auth": {"existingSecret": "redis"},
            "tls": {"enabled": True, "existingSecret": "redis-tls"},
        },
        "networkPolicy": {"prometheusNamespaces": ["monitoring", "observability"]},
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
            }
        ],
    }
    for mode in ({}, values):  # defaults (cluster-wide), then everything the cluster can take
        release = unique("h")
        rendered = template(helm, release, release_namespace, mode, "--include-crds")
        objs = documents(rendered)
        assert "CustomResourceDefinition" in {o["kind"] for o in objs}
        proc = kube.run("apply", "--dry-run=server", "-f", "-", stdin=rendered)
        assert len(proc.stdout.strip().splitlines()) == len(objs), proc.stdout


def test_helm_install_dry_run_renders_notes(helm: Helm, kube: Kube, release_namespace: str) -> None:
    out = helm.run(
        "install",
        unique("h"),
        str(CHART),
        "--namespace",
        release_namespace,
        "--dry-run=server",
        "--skip-crds",
        values=MONITORING,
    )
    assert "kubectl get ap" in out
    assert "examples/agentpool.yaml" in out
    assert "policy-enforcing CNI" in out


def can(kube: Kube, who: str, *args: str) -> bool:
    proc = kube.run("auth", "can-i", f"--as={who}", *args, check=False)
    answer = proc.stdout.strip()
    assert answer in {"yes", "no"}, f"can-i {args}: {proc.stdout} {proc.stderr}"
    return answer == "yes"


def apply_rbac(
    helm: Helm, kube: Kube, applied: list[dict[str, Any]], namespace: str, values: dict[str, Any]
) -> str:
    release = unique("h")
    rendered = template(helm, release, namespace, values)
    objs = [o for o in documents(rendered) if o["kind"] in RBAC_KINDS]
    applied.extend(objs)
    kube.run("apply", "-f", "-", stdin=yaml.safe_dump_all(objs))
    (sa,) = [o for o in objs if o["kind"] == "ServiceAccount"]
    name = sa["metadata"]["name"]
    eventually(lambda: kube.exists("serviceaccount", name, namespace), 30, f"ServiceAccount {name}")
    return f"system:serviceaccount:{namespace}:{name}"


# Every API call the operator makes (derived from its code, plus kopf's), in the watched
# namespace W and the operator's namespace O; "W" and "O" are replaced by the test's namespaces.
OPERATOR_CALLS = operator_calls()
FORBIDDEN_CALLS = [
    # It writes pools' Secrets but never reads one back (tokens are derived from its own key).
    ("get", "secrets", "W"),
    ("list", "secrets", "W"),
    ("watch", "secrets", "W"),
    ("delete", "secrets", "W"),
    ("list", "secrets", "O"),
    ("get", "networkpolicies.networking.k8s.io", "W"),
    ("delete", "networkpolicies.networking.k8s.io", "W"),
    ("get", "configmaps", "W"),
    ("delete", "namespaces", ""),
    ("create", "deployments.apps", "W"),
    ("update", "nodes", ""),
    ("create", "pods --subresource=exec", "W"),
    ("delete", "agentpools.tars.dev", "W"),
    ("update", "pods", "W"),
    ("patch", "pods --subresource=status", "W"),
    ("delete", "events", "W"),
    ("update", "leases.coordination.k8s.io/kube-scheduler", "O"),
    ("delete", "leases.coordination.k8s.io/tars-operator", "O"),
    ("update", "leases.coordination.k8s.io/tars-operator", "W"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", ""),
    ("escalate", "clusterroles.rbac.authorization.k8s.io", ""),
]


def answers(
    kube: Kube, who: str, calls: list[tuple[str, str, str]], where: dict[str, str]
) -> dict[str, bool]:
    """`kubectl auth can-i` for each call: "verb resource in namespace" -> allowed."""
    result = {}
    for verb, resource, ns in calls:
        args = [verb, *resource.split()] + (["-n", where[ns]] if ns else [])
        result[f"{verb} {resource} in {where[ns] if ns else 'the cluster'}"] = can(kube, who, *args)
    return result


def assert_least_privilege(kube: Kube, who: str, where: dict[str, str]) -> None:
    missing = [call for call, ok in answers(kube, who, OPERATOR_CALLS, where).items() if not ok]
    assert missing == [], "the operator needs these calls"
    excess = [call for call, ok in answers(kube, who, FORBIDDEN_CALLS, where).items() if ok]
    assert excess == [], "the operator must not be able to make these calls"


def test_cluster_wide_service_account_can_do_what_the_operator_does(
    helm: Helm,
    kube: Kube,
    release_namespace: str,
    watched_namespace: str,
    applied: list[dict[str, Any]],
) -> None:
    who = apply_rbac(helm, kube, applied, release_namespace, {})
    assert_least_privilege(kube, who, {"W": watched_namespace, "O": release_namespace})
    # Cluster-wide mode needs no namespace listing (kopf lists namespaces only for name patterns).
    assert not can(kube, who, "list", "namespaces")


def test_namespaced_service_account_is_confined_to_its_namespaces(
    helm: Helm,
    kube: Kube,
    release_namespace: str,
    watched_namespace: str,
    applied: list[dict[str, Any]],
) -> None:
    who = apply_rbac(helm, kube, applied, release_namespace, {"watchNamespaces": [watched_namespace]})
    assert_least_privilege(kube, who, {"W": watched_namespace, "O": release_namespace})
    # Pods and pools only in the watched namespace: not in its own, not across the cluster.
    assert not can(kube, who, "list", "pods", "-n", release_namespace)
    assert not can(kube, who, "create", "pods", "-n", "default")
    assert not can(kube, who, "list", "pods", "--all-namespaces")
    assert not can(kube, who, "patch", "agentpools.tars.dev", "-n", "default")
    # kopf's namespace observation (read-only).
    assert can(kube, who, "watch", "namespaces")
