"""The operator as e2e tests run it: a real `tars-operator` process against the
local cluster, reaching Prometheus through a proxy the tests can cut."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from e2e.harness import Kube, TcpProxy, eventually, free_port, unique
from tars_localcluster.cluster import Cluster

REPO = Path(__file__).resolve().parents[1]


@dataclass
class OperatorProcess:
    proc: subprocess.Popen[bytes]
    metrics_port: int
    health_port: int
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


def start_operator(
    cluster: Cluster, prometheus_url: str, lease_ns: str, identity: str, log: Path
) -> OperatorProcess:
    metrics_port, health_port = free_port(), free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tars_operator",
                f"--kubeconfig={cluster.cfg.admin_kubeconfig}",
                f"--prometheus-url={prometheus_url}",
                f"--redis-url={cluster.cfg.redis_url}",
                f"--metrics-port={metrics_port}",
                f"--health-port={health_port}",
                f"--lease-namespace={lease_ns}",
                f"--identity={identity}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return OperatorProcess(proc, metrics_port, health_port, log)


@dataclass
class OperatorEnv:
    kube: Kube
    cluster: Cluster
    proxy: TcpProxy
    operator: OperatorProcess
    lease_ns: str
    tmp: Path


@pytest.fixture(scope="module")
def op(kube: Kube, cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorEnv]:
    # One operator at a time: a demo operator (`make demo`) would act on the tests' pools too.
    cluster.daemons["operator"].stop()
    kube.run("apply", "-f", str(REPO / "crds"))
    kube.run("wait", "--for=condition=Established", "crd/agentpools.tars.dev", "--timeout=30s")
    lease_ns = unique("tars-system")
    kube.run("create", "namespace", lease_ns)
    tmp = tmp_path_factory.mktemp("operator")
    # Prometheus through a proxy the tests can cut: a metrics outage as the operator sees one.
    proxy = TcpProxy((cluster.cfg.gateway_ip, cluster.cfg.prometheus_port))
    proxy.start()
    operator = start_operator(cluster, f"http://127.0.0.1:{proxy.port}", lease_ns, "op-a", tmp / "op-a.log")
    eventually(
        lambda: httpx.get(f"http://127.0.0.1:{operator.health_port}/healthz", timeout=2).status_code == 200,
        60,
        "the operator's liveness endpoint",
    )
    env = OperatorEnv(kube, cluster, proxy, operator, lease_ns, tmp)
    yield env
    env.operator.stop()
    proxy.stop()
    kube.run("delete", "namespace", lease_ns, "--wait=false", check=False)
