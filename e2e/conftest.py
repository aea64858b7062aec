"""The e2e session fixture: the local cluster, started once per session (or
reused when one is already running) and stopped afterwards if this session
started it. Set TARS_KEEP_CLUSTER=1 to leave it running for debugging."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from e2e.harness import Kube, temporary_namespace
from e2e.operator_env import op  # noqa: F401 - a fixture shared by the operator test modules
from tars_localcluster.cluster import Cluster
from tars_localcluster.config import ClusterConfig


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    cluster = Cluster(ClusterConfig.default())
    started_here = not cluster.is_up()
    cluster.up(build=True)
    yield cluster
    if started_here and not os.environ.get("TARS_KEEP_CLUSTER"):
        cluster.down()
        # `make cluster-down` promises that no process, namespace or cgroup is left.
        assert cluster.leftovers() == []


@pytest.fixture(scope="session")
def kube(cluster: Cluster) -> Kube:
    return Kube(cluster.cfg.admin_kubeconfig, cluster.kubectl())


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    with temporary_namespace(kube, "e2e") as name:
        yield name


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
