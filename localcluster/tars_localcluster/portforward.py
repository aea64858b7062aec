"""`kubectl port-forward` as a context manager: the one way from this machine to a Service of any
cluster (a kind cluster's pod and Service addresses are not routed to the host)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def port_forward(
    kubectl: Sequence[str], namespace: str, target: str, port: int, timeout: float = 30
) -> Iterator[int]:
    """Forward a free local port to `target` (e.g. svc/redis) `port`; yield the local port."""
    local = free_port()
    proc = subprocess.Popen(
        [*kubectl, "port-forward", "-n", namespace, target, f"{local}:{port}", "--address=127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().strip() if proc.stderr else ""
                raise RuntimeError(f"kubectl port-forward {namespace}/{target}:{port} exited: {err}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", local)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"kubectl port-forward {namespace}/{target}:{port} did not listen in {timeout}s"
                )
            time.sleep(0.1)
        yield local
    finally:
        proc.terminate()
        proc.wait(10)
