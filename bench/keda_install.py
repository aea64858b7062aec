"""KEDA (operator + metrics adapter) for the scale-reaction benchmark: the manifests (pure), their
certificates, and the install into a cluster.

The manifests follow KEDA's own config/ of the module (config/manager, config/metrics-server,
config/rbac, config/crd/bases), with three differences that matter here:

* Certificates are ours, not KEDA's cert rotation: one CA, and one certificate for the operator's
  gRPC metrics service and the adapter's HTTPS (server and client auth: the adapter is the
  operator's mTLS client). Its SANs are the Services' names, the first one the default of
  `--metrics-service-address` (keda-operator.keda.svc.cluster.local:9666).
* RBAC is config/rbac/role.yaml trimmed to what runs: no cert rotation (so no writes to Secrets,
  APIServices or webhook configurations), no ScaledJobs (Jobs read-only), no leader election.
* The images are ours (tars_localcluster.images: keda-operator, keda-adapter), from binaries
  `hack/build-keda.sh` built.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tars_localcluster.kubectl import Kubectl

NAMESPACE = "keda"
OPERATOR = "keda-operator"
ADAPTER = "keda-metrics-apiserver"
SECRET = "kedaorg-certs"
APISERVICE = "v1beta1.external.metrics.k8s.io"
METRICS_SERVICE_PORT = 9666
NONROOT = 65532

JSON = dict[str, Any]


@dataclass(frozen=True)
class Images:
    operator: str
    adapter: str


@dataclass(frozen=True)
class Certificates:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def service_names(namespace: str = NAMESPACE, domain: str = "cluster.local") -> list[str]:
    """The SANs: every name a client may dial the operator's gRPC service or the adapter by; the
    first is what the adapter dials by default (--metrics-service-address)."""
    names = [f"{OPERATOR}.{namespace}.svc.{domain}"]
    for service in (OPERATOR, ADAPTER):
        names += [f"{service}.{namespace}.svc", f"{service}.{namespace}", service]
    return [*names, f"{ADAPTER}.{namespace}.svc.{domain}"]


def certificates(names: Sequence[str], now: dt.datetime | None = None) -> Certificates:
    """A fresh CA and a certificate for NAMES, valid a day: the benchmark installs KEDA anew."""
    now = now or dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keda-bench-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return Certificates(
        ca_pem=ca.public_bytes(pem),
        cert_pem=cert.public_bytes(pem),
        key_pem=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _meta(name: str, namespace: str | None = NAMESPACE, **labels: str) -> JSON:
    meta: JSON = {"name": name, "labels": {"app.kubernetes.io/part-of": "keda-operator", **labels}}
    if namespace:
        meta["namespace"] = namespace
    return meta


# What config/rbac/role.yaml grants that nothing here uses (see the module docstring).
_UNUSED_GROUPS = {"admissionregistration.k8s.io", "apiregistration.k8s.io", "coordination.k8s.io"}
_READ = ["get", "list", "watch"]


def trimmed_rules(rules: Sequence[Mapping[str, Any]]) -> list[JSON]:
    """KEDA's rules without cert rotation, leader election and ScaledJobs: rules of the groups
    only those use are dropped; Jobs and Secrets become read-only."""
    kept: list[JSON] = []
    for rule in rules:
        groups = set(rule.get("apiGroups", []))
        if groups and groups <= _UNUSED_GROUPS:
            continue
        rule = dict(rule)
        if groups == {"batch"} or (groups == {""} and rule.get("resources") == ["secrets"]):
            rule["verbs"] = [v for v in rule["verbs"] if v in _READ]
        kept.append(rule)
    return kept


def rbac(keda_rbac: Sequence[Mapping[str, Any]]) -> list[JSON]:
    """The ServiceAccount, the trimmed operator roles (from config/rbac/role.yaml's documents) and
    the metrics server's bindings (config/metrics-server), for the one ServiceAccount both use."""
    subject = [{"kind": "ServiceAccount", "name": OPERATOR, "namespace": NAMESPACE}]
    objects: list[JSON] = [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(OPERATOR)}]
    for doc in keda_rbac:
        kind = doc["kind"]
        namespaced = kind == "Role"
        objects.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": kind,
                "metadata": _meta(OPERATOR, NAMESPACE if namespaced else None),
                "rules": trimmed_rules(doc["rules"]),
            }
        )
        objects.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": f"{kind}Binding",
                "metadata": _meta(OPERATOR, NAMESPACE if namespaced else None),
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": OPERATOR},
                "subjects": subject,
            }
        )
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1"}
    objects += [
        # The adapter is an aggregated API server: it delegates authentication and authorization.
        {
            **binding,
            "kind": "ClusterRoleBinding",
            "metadata": _meta("keda-system-auth-delegator", None),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:auth-delegator",
            },
            "subjects": subject,
        },
        {
            **binding,
            "kind": "RoleBinding",
            "metadata": _meta("keda-auth-reader", "kube-system"),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "extension-apiserver-authentication-reader",
            },
            "subjects": subject,
        },
        # The HPA controller reads the external metrics KEDA serves.
        {
            **binding,
            "kind": "ClusterRole",
            "metadata": _meta("keda-external-metrics-reader", None),
            "rules": [{"apiGroups": ["external.metrics.k8s.io"], "resources": ["*"], "verbs": _READ}],
        },
        {
            **binding,
            "kind": "ClusterRoleBinding",
            "metadata": _meta("keda-hpa-controller-external-metrics", None),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "keda-external-metrics-reader",
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": "horizontal-pod-autoscaler", "namespace": "kube-system"}
            ],
        },
    ]
    return objects


_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": NONROOT,
    "runAsGroup": NONROOT,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
_ENV = [
    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    {"name": "KEDA_CLUSTER_OBJECT_NAMESPACE", "value": NAMESPACE},
    {"name": "WATCH_NAMESPACE", "value": ""},
]


def _deployment(name: str, container: JSON, volumes: list[JSON]) -> JSON:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, app=name),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "serviceAccountName": OPERATOR,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [
                        {
                            "name": name,
                            "imagePullPolicy": "IfNotPresent",
                            "env": _ENV,
                            "securityContext": _SECURITY,
                            "resources": {"requests": {"cpu": "100m", "memory": "100Mi"}},
                            **container,
                        }
                    ],
                    "volumes": [{"name": "certificates", "secret": {"secretName": SECRET}}, *volumes],
                    "terminationGracePeriodSeconds": 10,
                },
            },
        },
    }


def _probe(path: str, port: int, scheme: str = "HTTP") -> JSON:
    return {"httpGet": {"path": path, "port": port, "scheme": scheme}, "periodSeconds": 2}


def workloads(images: Images, certs: Certificates) -> list[JSON]:
    """The certificates' Secret, the operator and the adapter (config/manager, config/metrics-server),
    their Services and the external-metrics APIService."""
    certs_mount = {"name": "certificates", "mountPath": "/certs", "readOnly": True}
    operator = _deployment(
        OPERATOR,
        {
            "image": images.operator,
            "command": ["/keda"],
            "args": [
                "--leader-elect=false",
                "--zap-log-level=info",
                "--zap-encoder=console",
                "--zap-time-encoding=rfc3339",
                "--enable-cert-rotation=false",
                "--cert-dir=/certs",
            ],
            "ports": [
                {"containerPort": 8080, "name": "http"},
                {"containerPort": METRICS_SERVICE_PORT, "name": "metricsservice"},
            ],
            "readinessProbe": _probe("/readyz", 8081),
            "livenessProbe": {**_probe("/healthz", 8081), "initialDelaySeconds": 25, "periodSeconds": 10},
            "volumeMounts": [certs_mount],
        },
        [],
    )
    adapter = _deployment(
        ADAPTER,
        {
            "image": images.adapter,
            "command": ["/keda-adapter"],
            "args": [
                "--secure-port=6443",
                "--zap-log-level=info",
                "--client-ca-file=/certs/ca.crt",
                "--tls-cert-file=/certs/tls.crt",
                "--tls-private-key-file=/certs/tls.key",
                "--cert-dir=/certs",
                f"--metrics-service-address={service_names()[0]}:{METRICS_SERVICE_PORT}",
            ],
            "ports": [{"containerPort": 6443, "name": "https"}, {"containerPort": 8080, "name": "http"}],
            "readinessProbe": _probe("/readyz", 6443, "HTTPS"),
            "livenessProbe": {
                **_probe("/healthz", 6443, "HTTPS"),
                "initialDelaySeconds": 5,
                "periodSeconds": 10,
            },
            "volumeMounts": [certs_mount, {"name": "temp-vol", "mountPath": "/tmp"}],
        },
        [{"name": "temp-vol", "emptyDir": {}}],
    )
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta(SECRET),
            "type": "Opaque",
            "data": {
                "ca.crt": _b64(certs.ca_pem),
                "tls.crt": _b64(certs.cert_pem),
                "tls.key": _b64(certs.key_pem),
            },
        },
        operator,
        adapter,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(OPERATOR),
            "spec": {
                "selector": {"app": OPERATOR},
                "ports": [
                    {
                        "name": "metricsservice",
                        "port": METRICS_SERVICE_PORT,
                        "targetPort": METRICS_SERVICE_PORT,
                    }
                ],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(ADAPTER),
            "spec": {
                "selector": {"app": ADAPTER},
                "ports": [{"name": "https", "port": 443, "targetPort": 6443}],
            },
        },
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": _meta(APISERVICE, None),
            "spec": {
                "service": {"name": ADAPTER, "namespace": NAMESPACE, "port": 443},
                "group": "external.metrics.k8s.io",
                "version": "v1beta1",
                "caBundle": _b64(certs.ca_pem),
                "groupPriorityMinimum": 100,
                "versionPriority": 100,
            },
        },
    ]


def crds(module_dir: Path) -> str:
    """KEDA's CRDs as the module ships them (config/crd/bases), one YAML stream."""
    files = sorted((module_dir / "config" / "crd" / "bases").glob("*.yaml"))
    if not files:
        raise SystemExit(f"no CRDs under {module_dir}/config/crd/bases: is that the kedacore/keda/v2 module?")
    return "\n---\n".join(f.read_text() for f in files)


def module_rbac(module_dir: Path) -> list[JSON]:
    docs = yaml.safe_load_all((module_dir / "config" / "rbac" / "role.yaml").read_text())
    return [d for d in docs if d and d.get("kind") in ("ClusterRole", "Role")]


def condition_true(obj: Mapping[str, Any], kind: str) -> bool:
    """Whether the object's status has condition `kind` True (a fresh object has no status yet)."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)


def wait_for_condition(kubectl: Kubectl, obj: str, kind: str, timeout_s: float, hint: str = "") -> None:
    """Poll `obj` (kind/name) until its condition `kind` is True. Not `kubectl wait`: it fails at
    once on an object created a moment ago, whose status has no conditions yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = kubectl.run("get", obj, "-o", "json", check=False)
        if got.returncode == 0 and condition_true(json.loads(got.stdout), kind):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{obj} is not {kind} after {timeout_s:.0f} s: {got.stdout[-800:]}{hint}")
        time.sleep(1)  # polling the condition with a deadline


def install(kubectl: Kubectl, module_dir: Path, images: Images, timeout_s: float = 180) -> float:
    """Install KEDA into NAMESPACE and wait until the operator is Ready and the APIService is
    Available (the aggregation layer's proof: the API server reaches the adapter and trusts it).
    Returns the seconds it took."""
    started = time.monotonic()
    kubectl.run("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=crds(module_dir))
    wait_for_condition(kubectl, "crd/scaledobjects.keda.sh", "Established", 60)
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    objects = [namespace, *rbac(module_rbac(module_dir)), *workloads(images, certificates(service_names()))]
    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump_all(objects))
    for name in (OPERATOR, ADAPTER):
        kubectl.run(
            "rollout", "status", "-n", NAMESPACE, f"deployment/{name}", f"--timeout={int(timeout_s)}s"
        )
    hint = f"\ncheck the adapter: kubectl logs -n {NAMESPACE} deploy/{ADAPTER}"
    wait_for_condition(kubectl, f"apiservice/{APISERVICE}", "Available", timeout_s, hint)
    return time.monotonic() - started


def uninstall(kubectl: Kubectl) -> None:
    """Remove what install() created outside the namespace, then the namespace (CRDs stay)."""
    kubectl.run("delete", "apiservice", APISERVICE, "--ignore-not-found", check=False)
    for kind, name in (
        ("clusterrolebinding", OPERATOR),
        ("clusterrole", OPERATOR),
        ("clusterrolebinding", "keda-system-auth-delegator"),
        ("clusterrolebinding", "keda-hpa-controller-external-metrics"),
        ("clusterrole", "keda-external-metrics-reader"),
    ):
        kubectl.run("delete", kind, name, "--ignore-not-found", check=False)
    kubectl.run(
        "delete", "rolebinding", "keda-auth-reader", "-n", "kube-system", "--ignore-not-found", check=False
    )
    kubectl.run("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=false", check=False)
