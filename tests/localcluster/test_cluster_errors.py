"""The cluster manager's errors name the cause and the fix."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tars_localcluster.cluster import Cluster
from tars_localcluster.config import ClusterConfig
from tars_localcluster.procs import ClusterError, Daemon, run, wait_for


def test_port_in_use_is_named_with_the_way_to_find_its_owner(tmp_path: Path) -> None:
    cluster = Cluster(ClusterConfig(root=tmp_path))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ClusterError, match=rf"port 127\.0\.0\.1:{port} is in use.*ss -ltnp"):
            cluster._ensure("etcd", ["/bin/true"], lambda: False, [("127.0.0.1", port)])


def test_missing_binary_names_the_build_target(tmp_path: Path) -> None:
    daemon = Daemon("kube-apiserver", tmp_path, tmp_path)
    with pytest.raises(
        ClusterError, match=r"binary /nonexistent/kube-apiserver is missing.*make cluster-build"
    ):
        daemon.start(["/nonexistent/kube-apiserver"])


def test_a_daemon_that_dies_while_starting_is_reported_with_its_log(tmp_path: Path) -> None:
    daemon = Daemon("broken", tmp_path, tmp_path)
    daemon.start(["/bin/sh", "-c", "echo 'flag provided but not defined: -x'; exit 2"])
    with pytest.raises(
        ClusterError, match=r"(?s)broken exited while waiting for health.*flag provided but not defined"
    ):
        wait_for("health", lambda: False, 10, daemon)
    assert daemon.pid() is None


def test_a_command_that_hangs_is_reported_naming_it() -> None:
    with pytest.raises(ClusterError, match=r"`/bin/sleep 5` did not finish within 1s"):
        run(["/bin/sleep", "5"], timeout=1)
