"""The operator as users run it: `helm install` of the chart, the operator in-cluster from its
image under the chart's ServiceAccount and RBAC, the chart's Redis, the cluster's Prometheus
(prometheus-operator, fed by the chart's PodMonitor/ServiceMonitor/PrometheusRule)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from e2e.harness import IMAGES, Kube, Prometheus, eventually, unique
from tars_contract import contract
from tars_localcluster.config import cached_tool

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "tars-operator"


def find_helm() -> str:
    found = cached_tool("helm", os.environ.get("HELM"))
    if found is None:
        pytest.fail(
            "helm not found ($HELM, $TARS_CACHE/bin/helm, PATH): run `make cluster-build`", pytrace=False
        )
    return found


def image_values(ref: str) -> dict[str, str]:
    repository, _, tag = ref.rpartition(":")
    return {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"}


def e2e_values(prometheus: Prometheus) -> dict[str, Any]:
    """The chart's values for the suite: defaults, plus what the tests need to be quick."""
    return {
        "replicas": 1,
        "image": image_values(IMAGES.operator),
        "prometheusUrl": prometheus.in_cluster_url,
        "redis": {"enabled": True, "image": image_values(IMAGES.redis)},
        # The suite's Prometheus scrapes the agents (under a policy-enforcing CNI, e.g. kind's).
        "networkPolicy": {"prometheusNamespaces": [prometheus.namespace]},
        "podMonitor": {"enabled": True, "interval": "2s", "scrapeTimeout": "2s"},
        "serviceMonitor": {"enabled": True, "interval": "5s", "scrapeTimeout": "4s"},
        "prometheusRule": {"enabled": True},
        "extraArgs": ["--log-format=text"],
    }


@dataclass
class Helm:
    binary: str
    kube: Kube

    def run(
        self, *args: str, values: dict[str, Any] | None = None, timeout: float = 300, check: bool = True
    ) -> str:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            yaml.safe_dump(values or {}, f)
            f.flush()
            proc = subprocess.run(
                [
                    self.binary,
                    "--kubeconfig",
                    str(self.kube.kubeconfig),
                    *args,
                    *(["-f", f.name] if values else []),
                ],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        assert proc.returncode == 0 or not check, f"helm {' '.join(args)} failed: {proc.stderr}"
        return proc.stdout


@dataclass
class OperatorEnv:
    kube: Kube
    helm: Helm
    prometheus: Prometheus
    namespace: str  # the release's namespace
    # A name of its own (a `make demo` release may exist: cluster-scoped RBAC names must differ);
    # it contains the chart's name, so the chart names its objects <release>, <release>-redis, ...
    release: str = field(default_factory=lambda: unique("tars-operator"))
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def selector(self) -> str:
        return f"app.kubernetes.io/instance={self.release},app.kubernetes.io/component=operator"

    def install(self) -> None:
        self._helm("install")

    def upgrade(self, **changes: Any) -> None:
        self.values = {**self.values, **changes}
        self._helm("upgrade")

    def _helm(self, verb: str) -> None:
        self.helm.run(
            verb, self.release, str(CHART), "-n", self.namespace, "--wait", "--timeout=3m", values=self.values
        )

    def pods(self) -> list[dict[str, Any]]:
        return [
            p
            for p in self.kube.pods(self.namespace, self.selector)
            if not p["metadata"].get("deletionTimestamp")
        ]

    def leader(self) -> str:
        """The pod holding the Lease (its holderIdentity is the pod's name)."""
        lease = self.kube.get("lease", "tars-operator", self.namespace)
        return str(lease["spec"]["holderIdentity"])

    def wait_leader(self, timeout: float = 60) -> str:
        names = lambda: {p["metadata"]["name"] for p in self.pods()}  # noqa: E731
        return eventually(
            lambda: self.leader() if self.leader() in names() else None, timeout, "an operator pod leading"
        )

    def metrics(self) -> str:
        """The leading operator's /metrics, through the API server's pod proxy."""
        return self.kube.pod_get(self.namespace, self.wait_leader(), 9100, "/metrics")

    def logs(self, pod: str) -> str:
        return self.kube.run("logs", pod, "-n", self.namespace, check=False).stdout

    def redis_password(self) -> str:
        """The password the chart generated for its Redis (Redis refuses clients without it)."""
        return self.kube.secret_value(self.namespace, f"{self.release}-redis", "redis-password")

    @contextlib.contextmanager
    def redis(self) -> Iterator[redis.Redis]:
        """A client of the release's Redis, through a port-forward."""
        with self.kube.port_forward(self.namespace, f"svc/{self.release}-redis", 6379) as port:
            client = redis.Redis(port=port, password=self.redis_password(), socket_timeout=5)
            try:
                yield client
            finally:
                client.close()

    def set_budget_use(self, namespace: str, pool: str, value: float) -> None:
        """What the pool's fake agents report as its budget's use."""
        with self.redis() as client:
            client.set(f"tars-e2e:{namespace}/{pool}:budget", str(value))

    def set_queue(self, namespace: str, pool: str, waiting: int) -> None:
        """The pool's queue holds `waiting` tasks nobody takes, in its normal-priority stream: what
        its fake agents export as tars_queue_depth and the operator counts in Redis itself."""
        stream = contract.queue_stream_key(namespace, pool, "normal")
        with self.redis() as client, client.pipeline(transaction=True) as pipe:
            pipe.delete(stream)
            pipe.xgroup_create(stream, contract.QUEUE_GROUP, id="0", mkstream=True)
            for n in range(waiting):
                pipe.xadd(stream, {"e2e-placeholder": str(n)})
            pipe.execute()


@pytest.fixture(scope="module")
def op(kube: Kube, prometheus: Prometheus) -> Iterator[OperatorEnv]:
    """The chart installed once per test module, in a namespace of its own; uninstalled afterwards."""
    namespace = unique("tars-e2e")
    kube.run("create", "namespace", namespace)
    env = OperatorEnv(kube, Helm(find_helm(), kube), prometheus, namespace, values=e2e_values(prometheus))
    try:
        env.install()
        env.wait_leader()
        yield env
    finally:
        for pod in env.pods():
            print(f"--- operator pod {pod['metadata']['name']} log (tail) ---")
            print("\n".join(env.logs(pod["metadata"]["name"]).splitlines()[-40:]))
        # A test may have uninstalled the release already.
        env.helm.run("uninstall", env.release, "-n", namespace, timeout=120, check=False)
        kube.run("delete", "namespace", namespace, "--wait=false", check=False)
