"""What `helm template` renders: whole objects, compared the way kubespawner's tests do."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import NAMESPACE, VALUES_ALL, Obj, Render, by_kind, one

FULLNAME = "t-tars-operator"
SELECTOR = {
    "app.kubernetes.io/name": "tars-operator",
    "app.kubernetes.io/instance": "t",
    "app.kubernetes.io/component": "operator",
}

# What the operator calls, one rule per reason (helm/tars-operator/templates/_helpers.tpl).
WATCH_RULES = [
    {"apiGroups": ["tars.dev"], "resources": ["agentpools"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["tars.dev"], "resources": ["agentpools/status"], "verbs": ["get", "patch"]},
    {
        "apiGroups": [""],
        "resources": ["pods"],
        "verbs": ["get", "list", "watch", "create", "delete", "patch"],
    },
    {"apiGroups": [""], "resources": ["pods/resize"], "verbs": ["patch"]},
    {"apiGroups": ["tars.dev"], "resources": ["agentpools/finalizers"], "verbs": ["update"]},
    # Each pool's Secret and NetworkPolicy, server-side applied: never read back.
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "patch"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["create", "patch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
]
CRD_WATCH = {
    "apiGroups": ["apiextensions.k8s.io"],
    "resources": ["customresourcedefinitions"],
    "verbs": ["list", "watch"],
}
NAMESPACE_WATCH = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}
LEASE_RULES = [
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "resourceNames": ["tars-operator"],
        "verbs": ["get", "update"],
    },
]
SUBJECTS = [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]


def kinds(objs: list[Obj]) -> list[tuple[str, str, str | None]]:
    return sorted((o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in objs)


def operator(objs: list[Obj]) -> Obj:
    return one(objs, "Deployment", FULLNAME)


def container(objs: list[Obj]) -> Obj:
    containers: list[Obj] = operator(objs)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_default_objects(render: Render) -> None:
    assert kinds(render()) == [
        ("ClusterRole", FULLNAME, None),
        ("ClusterRole", f"{FULLNAME}-observer", None),
        ("ClusterRoleBinding", FULLNAME, None),
        ("ClusterRoleBinding", f"{FULLNAME}-observer", None),
        ("Deployment", FULLNAME, NAMESPACE),
        ("PodDisruptionBudget", FULLNAME, NAMESPACE),
        ("Role", f"{FULLNAME}-leader-election", NAMESPACE),
        ("RoleBinding", f"{FULLNAME}-leader-election", NAMESPACE),
        ("Secret", f"{FULLNAME}-agent-auth", NAMESPACE),
        ("Service", f"{FULLNAME}-metrics", NAMESPACE),
        ("ServiceAccount", FULLNAME, NAMESPACE),
    ]


def test_operator_container(render: Render) -> None:
    assert container(render()) == {
        "name": "operator",
        "image": "ghcr.io/tars-dev/tars-operator:0.1.0",
        "imagePullPolicy": "IfNotPresent",
        "command": ["tars-operator"],
        "args": [
            "--prometheus-url=http://prometheus:9090",
            "--network-policy",
            "--operator-pod-labels=app.kubernetes.io/component=operator,app.kubernetes.io/instance=t,"
            "app.kubernetes.io/name=tars-operator",
            "--prometheus-namespace=monitoring",
            "--metrics-port=9100",
            "--health-port=8081",
            "--lease-name=tars-operator",
        ],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {
                "name": "TARS_AGENT_TOKEN_KEY",
                "valueFrom": {"secretKeyRef": {"name": f"{FULLNAME}-agent-auth", "key": "token-key"}},
            },
            {"name": "HOME", "value": "/tmp"},
            {"name": "TMPDIR", "value": "/tmp"},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "ports": [
            {"name": "metrics", "containerPort": 9100, "protocol": "TCP"},
            {"name": "health", "containerPort": 8081, "protocol": "TCP"},
        ],
        # kopf's /healthz is served by the leader only (see values.yaml probes.kopfHealthz).
        "livenessProbe": {
            "httpGet": {"path": "/metrics", "port": "metrics"},
            "initialDelaySeconds": 10,
            "periodSeconds": 20,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/metrics", "port": "metrics"},
            "initialDelaySeconds": 2,
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }


def test_operator_pod(render: Render) -> None:
    deploy = operator(render())
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["selector"] == {"matchLabels": SELECTOR}
    assert deploy["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    template = deploy["spec"]["template"]
    assert SELECTOR.items() <= template["metadata"]["labels"].items()
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9100",
        "prometheus.io/path": "/metrics",
    }
    spec = {k: v for k, v in template["spec"].items() if k != "containers"}
    assert spec == {
        "serviceAccountName": FULLNAME,
        "automountServiceAccountToken": True,
        "terminationGracePeriodSeconds": 30,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": SELECTOR},
                        },
                    }
                ]
            }
        },
    }


def test_pod_disruption_budget(render: Render) -> None:
    pdb = one(render(), "PodDisruptionBudget")
    assert pdb["spec"] == {
        "minAvailable": 1,
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
        "selector": {"matchLabels": SELECTOR},
    }
    assert by_kind(render({"replicas": 1}), "PodDisruptionBudget") == []


def test_cluster_wide_rbac(render: Render) -> None:
    objs = render()
    assert one(objs, "ClusterRole", FULLNAME)["rules"] == WATCH_RULES
    assert one(objs, "ClusterRole", f"{FULLNAME}-observer")["rules"] == [CRD_WATCH]
    for name in (FULLNAME, f"{FULLNAME}-observer"):
        binding = one(objs, "ClusterRoleBinding", name)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": name,
        }
        assert binding["subjects"] == SUBJECTS
    lease_role = one(objs, "Role", f"{FULLNAME}-leader-election")
    assert lease_role["metadata"]["namespace"] == NAMESPACE
    assert lease_role["rules"] == LEASE_RULES
    assert one(objs, "RoleBinding")["subjects"] == SUBJECTS


def test_namespaced_rbac_when_watch_namespaces_set(render: Render) -> None:
    objs = render({"watchNamespaces": ["team-a", "team-b"]})
    assert "--namespace=team-a" in container(objs)["args"]
    assert "--namespace=team-b" in container(objs)["args"]
    # No cluster-wide grant on pods or pools: only the read-only observer is cluster-scoped.
    assert [o["metadata"]["name"] for o in by_kind(objs, "ClusterRole")] == [f"{FULLNAME}-observer"]
    assert one(objs, "ClusterRole")["rules"] == [CRD_WATCH, NAMESPACE_WATCH]
    roles = {
        o["metadata"]["namespace"]: o for o in by_kind(objs, "Role") if o["metadata"]["name"] == FULLNAME
    }
    assert sorted(roles) == ["team-a", "team-b"]
    for role in roles.values():
        assert role["rules"] == WATCH_RULES
    bindings = [o for o in by_kind(objs, "RoleBinding") if o["metadata"]["name"] == FULLNAME]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": FULLNAME,
        }
        assert binding["subjects"] == SUBJECTS


def test_fully_namespaced_without_kopf_observation(render: Render) -> None:
    objs = render({"watchNamespaces": ["team-a"], "rbac": {"kopfObservation": False}})
    assert by_kind(objs, "ClusterRole") == []
    assert by_kind(objs, "ClusterRoleBinding") == []


def test_no_rbac_and_existing_service_account(render: Render) -> None:
    objs = render({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"}})
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"} & {
        o["kind"] for o in objs
    }
    assert operator(objs)["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


def test_leader_election_off(render: Render) -> None:
    objs = render({"leaderElection": {"enabled": False}, "replicas": 1})
    assert "--no-leader-election" in container(objs)["args"]
    assert not any(o["metadata"]["name"].endswith("-leader-election") for o in objs)


def test_lease_name_follows_value(render: Render) -> None:
    objs = render({"leaderElection": {"leaseName": "tars-blue"}})
    assert "--lease-name=tars-blue" in container(objs)["args"]
    role = one(objs, "Role", f"{FULLNAME}-leader-election")
    assert role["rules"][1]["resourceNames"] == ["tars-blue"]


def test_image_and_urls(render: Render) -> None:
    values: dict[str, Any] = {
        "image": {"repository": "registry.example/tars", "tag": "0.2.0-rc1", "pullPolicy": "Always"},
        "prometheusUrl": "https://prom.example:9443",
        "redisUrl": "rediss://redis.example:6380/1",
    }
    c = container(render(values))
    assert (c["image"], c["imagePullPolicy"]) == ("registry.example/tars:0.2.0-rc1", "Always")
    assert c["args"][:2] == [
        "--prometheus-url=https://prom.example:9443",
        "--redis-url=rediss://redis.example:6380/1",
    ]


def test_redis_url_defaults_to_the_bundled_redis(render: Render) -> None:
    c = container(render({"redis": {"enabled": True}}))
    assert f"--redis-url=redis://{FULLNAME}-redis.{NAMESPACE}.svc:6379/0" in c["args"]
    explicit = container(render({"redis": {"enabled": True}, "redisUrl": "redis://mine:6379/0"}))
    assert "--redis-url=redis://mine:6379/0" in explicit["args"]


def test_kopf_healthz_liveness(render: Render) -> None:
    c = container(render({"probes": {"kopfHealthz": True}}))
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_topology_spread_gets_the_selector(render: Render) -> None:
    spread = {
        "maxSkew": 1,
        "topologyKey": "topology.kubernetes.io/zone",
        "whenUnsatisfiable": "ScheduleAnyway",
    }
    pod = operator(render({"topologySpreadConstraints": [spread]}))["spec"]["template"]["spec"]
    assert pod["topologySpreadConstraints"] == [{**spread, "labelSelector": {"matchLabels": SELECTOR}}]


def test_metrics_service(render: Render) -> None:
    svc = one(render(), "Service")
    assert svc["spec"] == {
        "type": "ClusterIP",
        "selector": SELECTOR,
        "ports": [{"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}],
    }


OPTIONAL = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap", "PersistentVolumeClaim"}


def test_optional_objects_off_by_default(render: Render) -> None:
    objs = render()
    assert not OPTIONAL & {o["kind"] for o in objs}
    assert not any("redis" in o["metadata"]["name"] for o in objs)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"serviceMonitor": {"enabled": True}}, [("ServiceMonitor", FULLNAME)]),
        ({"podMonitor": {"enabled": True}}, [("PodMonitor", f"{FULLNAME}-agents")]),
        ({"prometheusRule": {"enabled": True}}, [("PrometheusRule", FULLNAME)]),
        ({"dashboard": {"enabled": True}}, [("ConfigMap", f"{FULLNAME}-dashboard")]),
        (
            {"redis": {"enabled": True}},
            [
                ("Deployment", f"{FULLNAME}-redis"),
                ("Secret", f"{FULLNAME}-redis"),
                ("Service", f"{FULLNAME}-redis"),
            ],
        ),
    ],
    ids=["serviceMonitor", "podMonitor", "prometheusRule", "dashboard", "redis"],
)
def test_each_optional_object_appears_when_enabled(
    render: Render, values: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    default = {(o["kind"], o["metadata"]["name"]) for o in render()}
    added = {(o["kind"], o["metadata"]["name"]) for o in render(values)} - default
    assert sorted(added) == sorted(expected)


def test_everything_on(render: Render) -> None:
    objs = render(None, VALUES_ALL)
    assert {o["kind"] for o in objs} >= OPTIONAL
    assert one(objs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    pod = operator(objs)["spec"]["template"]["spec"]
    assert pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == [
        {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": SELECTOR}}
    ]


def test_bundled_redis(render: Render) -> None:
    objs = render(None, VALUES_ALL)
    deploy = one(objs, "Deployment", f"{FULLNAME}-redis")
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    pod = deploy["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    (redis,) = pod["containers"]
    assert redis["command"] == ["redis-server"]
    assert redis["args"] == [
        "--port", "0", "--tls-port", "6379", "--tls-cert-file", "/tls/tls.crt",
        "--tls-key-file", "/tls/tls.key", "--tls-ca-cert-file", "/tls/ca.crt", "--tls-auth-clients", "no",
        "--dir", "/data", "--appendonly", "yes", "--appendfsync", "everysec",
        "--requirepass", "$(REDIS_PASSWORD)",
    ]  # fmt: skip
    assert redis["env"] == [
        {
            "name": "REDIS_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "tars-redis", "key": "redis-password"}},
        }
    ]
    assert redis["securityContext"]["runAsNonRoot"] is True
    assert redis["securityContext"]["readOnlyRootFilesystem"] is True
    assert redis["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert redis["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"memory": "512Mi"},
    }
    assert pod["volumes"] == [
        {"name": "data", "persistentVolumeClaim": {"claimName": f"{FULLNAME}-redis"}},
        {"name": "tls", "secret": {"secretName": "tars-redis-tls"}},
    ]
    pvc = one(objs, "PersistentVolumeClaim")
    assert pvc["spec"]["resources"] == {"requests": {"storage": "2Gi"}}
    svc = one(objs, "Service", f"{FULLNAME}-redis")
    assert svc["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [{"name": "redis", "port": 6379, "targetPort": "redis", "protocol": "TCP"}]
    # The operator's selector must not match the Redis pod (and the reverse).
    assert operator(objs)["spec"]["selector"]["matchLabels"] != deploy["spec"]["selector"]["matchLabels"]


def test_bundled_redis_without_persistence(render: Render) -> None:
    deploy = one(render({"redis": {"enabled": True}}), "Deployment", f"{FULLNAME}-redis")
    assert deploy["spec"]["template"]["spec"]["volumes"] == [{"name": "data", "emptyDir": {}}]


def test_every_object_is_labelled(render: Render) -> None:
    for obj in render(None, VALUES_ALL):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "t", obj["metadata"]["name"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "tars-operator-0.1.0"
