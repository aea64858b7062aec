"""kubectl with one kubeconfig: commands, port-forwards and the API server proxy.

The local cluster's own code, `make demo` and the benchmarks reach a cluster this way only, so that
they work with any kubeconfig (a kind cluster's pod and Service addresses are not routed to the host).
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tars_localcluster.procs import ClusterError, run


@dataclass(frozen=True)
class Kubectl:
    binary: str
    kubeconfig: Path | str

    @property
    def argv(self) -> list[str]:
        return [self.binary, f"--kubeconfig={self.kubeconfig}"]

    def run(
        self, *args: str, stdin: str | None = None, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = run([*self.argv, *args], check=False, stdin=stdin, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def port_forward(self, namespace: str, target: str, port: int) -> contextlib.AbstractContextManager[int]:
        """Forward a local port kubectl picks to `target` (e.g. svc/redis) `port`; yields the local port."""
        argv = [*self.argv, "port-forward", "-n", namespace, target, f":{port}", "--address=127.0.0.1"]
        return _listening(
            argv, re.compile(r"Forwarding from 127\.0\.0\.1:(\d+)"), f"{namespace}/{target}:{port}"
        )

    @contextlib.contextmanager
    def service_address(self, namespace: str, service: str, port: int) -> Iterator[tuple[str, int]]:
        """Where this host reaches `service`'s `port`: its ClusterIP when that answers from here (a
        node of the cluster, like the local cluster's host), else a port-forward's local port.

        A benchmark's load goes the way an in-cluster client's goes: a port-forward carries every
        byte through the API server, the kubelet and containerd, and at tens of tasks a second
        it took more CPU than the agents themselves (bench/README.md, warm_pickup)."""
        cluster_ip = self.run(
            "get", "service", "-n", namespace, service, "-o", "jsonpath={.spec.clusterIP}"
        ).stdout.strip()
        if cluster_ip and cluster_ip != "None":
            try:
                socket.create_connection((cluster_ip, port), timeout=1).close()
            except OSError:
                pass  # not routed to this host (kind): the port-forward below
            else:
                yield cluster_ip, port
                return
        with self.port_forward(namespace, f"svc/{service}", port) as local:
            yield "127.0.0.1", local

    @contextlib.contextmanager
    def proxy(self) -> Iterator[str]:
        """`kubectl proxy`: the API server at a local URL, with the kubeconfig's credentials."""
        argv = [*self.argv, "proxy", "--port=0", "--address=127.0.0.1"]
        with _listening(
            argv, re.compile(r"Starting to serve on 127\.0\.0\.1:(\d+)"), "the API server"
        ) as port:
            yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def _listening(argv: list[str], announces: re.Pattern[str], what: str, timeout: float = 30) -> Iterator[int]:
    """Run a kubectl that listens on a port it picks and prints; yield that port while it runs."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        deadline = time.monotonic() + timeout
        port = None
        while port is None:
            if time.monotonic() > deadline:
                raise ClusterError(f"kubectl {argv[2]} to {what} did not listen within {timeout:.0f}s")
            if not select.select([proc.stdout], [], [], 0.2)[0]:
                continue
            line = proc.stdout.readline()
            if not line:
                raise ClusterError(f"kubectl {argv[2]} to {what} exited: {proc.stderr.read().strip()}")
            if found := announces.search(line):
                port = int(found.group(1))
        # kubectl goes on printing (a line per forwarded connection): keep its pipes from filling up.
        for stream in (proc.stdout, proc.stderr):
            threading.Thread(target=stream.read, daemon=True).start()
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
