"""`up` keeps a healthy daemon, and restarts one whose command, configuration or binary changed;
`down` removes the sockets killed containerd shims leave behind."""

from __future__ import annotations

import socket
from pathlib import Path

from tars_localcluster.cluster import Cluster, remove_stale_sockets
from tars_localcluster.config import ClusterConfig

SLEEP = ["/bin/sleep", "300"]


def test_up_keeps_a_daemon_with_the_same_configuration_and_restarts_a_changed_one(tmp_path: Path) -> None:
    cluster = Cluster(ClusterConfig(root=tmp_path))
    config = tmp_path / "etcd.conf"
    daemon = cluster.daemons["etcd"]
    try:
        cluster._ensure("etcd", SLEEP, lambda: True, [], config=(config, "a: 1\n"))
        first = daemon.pid()
        assert first is not None and config.read_text() == "a: 1\n"

        cluster._ensure("etcd", SLEEP, lambda: True, [], config=(config, "a: 1\n"))
        assert daemon.pid() == first, "same command and configuration: kept"

        cluster._ensure("etcd", SLEEP, lambda: True, [], config=(config, "a: 2\n"))
        second = daemon.pid()
        assert second not in (None, first), "a changed configuration restarts the daemon"
        assert config.read_text() == "a: 2\n"

        cluster._ensure("etcd", [*SLEEP[:1], "301"], lambda: True, [], config=(config, "a: 2\n"))
        assert daemon.pid() not in (None, second), "a changed command restarts the daemon"
    finally:
        daemon.stop()


def test_stale_shim_sockets_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    folder = tmp_path / "containerd" / "s"
    folder.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(folder / "stale"))
    stale.close()  # the file stays, nobody listens: as after a killed shim
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(folder / "live"))
    live.listen()
    try:
        remove_stale_sockets(folder)
        assert sorted(p.name for p in folder.iterdir()) == ["live"]
    finally:
        live.close()
    (folder / "live").unlink()
    remove_stale_sockets(folder)
    assert not folder.exists() and not folder.parent.exists(), "an empty folder goes too"
