"""Helpers for e2e tests: kubectl, the API server's proxies, port-forwards, polling with a deadline.

Everything goes through the API server (kubectl with the suite's kubeconfig): the
same tests run against the local cluster and against any other cluster (kind),
where the test runner cannot route to pod or Service addresses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import os
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from tars_localcluster.kubectl import Kubectl

JSON = dict[str, Any]
T = TypeVar("T")
PROGRAMS = Path(__file__).resolve().parent / "programs"
PROGRAMS_CONFIGMAP = "e2e-programs"
PROGRAMS_MOUNT = "/e2e"


@dataclass(frozen=True)
class Images:
    """The images the suite runs (defaults: what `make images` builds; overridable for other clusters)."""

    agent: str = os.environ.get("TARS_E2E_AGENT_IMAGE", "ghcr.io/tars-dev/tars-agent:0.1.0")
    operator: str = os.environ.get("TARS_E2E_OPERATOR_IMAGE", "ghcr.io/tars-dev/tars-operator:0.1.0")
    redis: str = os.environ.get("TARS_E2E_REDIS_IMAGE", "localhost/tars/redis:7.0-bookworm")


IMAGES = Images()


def eventually(check: Callable[[], T], timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll `check` until it returns a truthy value; fail naming `what` and the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - remembered and reported if the deadline passes
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")
        time.sleep(interval)


async def async_eventually(
    check: Callable[[], object], timeout_s: float, what: str, interval: float = 0.02
) -> Any:
    """`eventually` inside a test's event loop: `check` may be sync or async, and the loop runs
    between polls; fail naming `what` and the last value seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last seen: {last!r}")
        await asyncio.sleep(interval)


@dataclass
class Kube:
    kubeconfig: Path
    kubectl_bin: str

    def run(
        self,
        *args: str,
        stdin: str | None = None,
        check: bool = True,
        extra: tuple[str, ...] = (),
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.kubectl_bin, "--kubeconfig", str(self.kubeconfig), *extra, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc

    def apply(self, *manifests: JSON, namespace: str | None = None) -> None:
        args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
        self.run(*args, stdin=yaml.safe_dump_all(manifests))

    def get(
        self, kind: str, name: str | None = None, namespace: str | None = None, selector: str | None = None
    ) -> JSON:
        args = ["get", kind] + ([name] if name else []) + ["-o", "json"]
        if namespace:
            args += ["-n", namespace]
        if selector:
            args += ["-l", selector]
        return json.loads(self.run(*args).stdout)

    def exists(self, kind: str, name: str, namespace: str) -> bool:
        proc = self.run("get", kind, name, "-n", namespace, "--ignore-not-found", "-o", "name", check=False)
        return bool(proc.stdout.strip())

    def pods(self, namespace: str, selector: str | None = None) -> list[JSON]:
        items: list[JSON] = self.get("pods", namespace=namespace, selector=selector)["items"]
        return items

    # ---- through the API server's proxies ---------------------------------
    def pod_get(self, namespace: str, pod: str, port: int, path: str) -> str:
        return self.run(
            "get", "--raw", f"/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy{path}"
        ).stdout

    def pod_post(self, namespace: str, pod: str, port: int, path: str) -> str:
        raw = f"/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy{path}"
        return self.run("create", "--raw", raw, "-f", "-", stdin="").stdout

    def service_get(self, namespace: str, service: str, port: int, path: str, **params: str) -> str:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        raw = f"/api/v1/namespaces/{namespace}/services/{service}:{port}/proxy{path}{query}"
        return self.run("get", "--raw", raw).stdout

    def port_forward(self, namespace: str, target: str, port: int) -> contextlib.AbstractContextManager[int]:
        """`kubectl port-forward` to `target` (e.g. svc/redis); the context yields the local port."""
        return Kubectl(self.kubectl_bin, self.kubeconfig).port_forward(namespace, target, port)

    def pod_request(
        self, namespace: str, pod: str, port: int, method: str, path: str, token: str | None = None
    ) -> httpx.Response:
        """One HTTP request to a pod's port through a port-forward, with `token` as bearer token
        (the API server's pod proxy would not pass an Authorization header on to the pod)."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        with self.port_forward(namespace, f"pod/{pod}", port) as local:
            return httpx.request(method, f"http://127.0.0.1:{local}{path}", headers=headers, timeout=10)

    def secret_value(self, namespace: str, name: str, key: str) -> str:
        """One key of a Secret, decoded (the suite runs as cluster admin)."""
        data: dict[str, str] = self.get("secret", name, namespace)["data"]
        return base64.b64decode(data[key]).decode()


@dataclass(frozen=True)
class Prometheus:
    """The cluster's Prometheus, queried through the API server's service proxy."""

    kube: Kube
    namespace: str
    service: str
    port: int

    @property
    def in_cluster_url(self) -> str:
        return f"http://{self.service}.{self.namespace}.svc:{self.port}"

    def api(self, path: str, **params: str) -> Any:
        body = json.loads(self.kube.service_get(self.namespace, self.service, self.port, path, **params))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[JSON]:
        result: list[JSON] = self.api("/api/v1/query", query=promql)["result"]
        return result


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def programs_configmap() -> JSON:
    """The test programs (e2e/programs) as a ConfigMap, run by the agent image's python."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": PROGRAMS_CONFIGMAP},
        "data": {p.name: p.read_text() for p in sorted(PROGRAMS.glob("*.py"))},
    }


@contextlib.contextmanager
def temporary_namespace(kube: Kube, prefix: str) -> Iterator[str]:
    """A fresh namespace, usable for pods (its default ServiceAccount and the test programs exist),
    deleted afterwards."""
    name = unique(prefix)
    kube.run("create", "namespace", name)
    kube.apply(programs_configmap(), namespace=name)
    # ServiceAccount admission refuses pods until the namespace's default SA exists.
    eventually(
        lambda: kube.exists("serviceaccount", "default", name), 30, f"default ServiceAccount in {name}"
    )
    try:
        yield name
    finally:
        kube.run("delete", "namespace", name, "--wait=false", check=False)


def condition(obj: JSON, kind: str) -> str | None:
    for cond in obj.get("status", {}).get("conditions", []):
        if cond["type"] == kind:
            return str(cond["status"])
    return None


def is_ready(pod: JSON) -> bool:
    return pod.get("status", {}).get("phase") == "Running" and condition(pod, "Ready") == "True"


RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def program_container(name: str, program: str, *args: str, **fields: Any) -> JSON:
    """A container running e2e/programs/<program> in the agent image (env POD_NAME and POD_IP
    from the downward API); the pod needs PROGRAMS_VOLUME."""
    container: JSON = {
        "name": name,
        "image": IMAGES.agent,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", f"{PROGRAMS_MOUNT}/{program}", *args],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
        "volumeMounts": [{"name": "programs", "mountPath": PROGRAMS_MOUNT, "readOnly": True}],
    }
    container.update(fields)
    return container


PROGRAMS_VOLUME = {"name": "programs", "configMap": {"name": PROGRAMS_CONFIGMAP}}


def pod(name: str, program: str, *args: str, labels: dict[str, str] | None = None, **container: Any) -> JSON:
    """A Pod running one test program, fit for the "restricted" Pod Security level (a read-only root
    with an emptyDir at /tmp)."""
    main = program_container("main", program, *args, securityContext=RESTRICTED_CONTAINER, **container)
    main["volumeMounts"].append({"name": "tmp", "mountPath": "/tmp"})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {"app": name}},
        "spec": {
            "containers": [main],
            "volumes": [PROGRAMS_VOLUME, {"name": "tmp", "emptyDir": {}}],
            "automountServiceAccountToken": False,
        },
    }
