"""Helpers for e2e tests: a kubectl wrapper and polling with a deadline."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

JSON = dict[str, Any]
T = TypeVar("T")
PROGRAMS = Path(__file__).resolve().parent / "programs"
PYTHON = sys.executable


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


@dataclass
class Kube:
    kubeconfig: Path
    kubectl_bin: str

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True, extra: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.kubectl_bin, "--kubeconfig", str(self.kubeconfig), *extra, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
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


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def temporary_namespace(kube: Kube, prefix: str) -> Iterator[str]:
    """A fresh namespace, usable for pods (its default ServiceAccount exists), deleted afterwards."""
    name = unique(prefix)
    kube.run("create", "namespace", name)
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


def container_status(pod: JSON, index: int = 0) -> JSON:
    statuses = pod.get("status", {}).get("containerStatuses", [])
    return statuses[index] if len(statuses) > index else {}


def pod(name: str, command: list[str], **spec: Any) -> JSON:
    """A Pod manifest running `command` as a local process (env POD_NAME and POD_IP from the downward API)."""
    container: JSON = {
        "name": "main",
        "image": "local/e2e:none",
        "command": command,
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
    }
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"containers": [container], **spec},
    }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TcpProxy:
    """A TCP forwarder a test can cut and restore: an outage of the service behind it,
    as its clients see it, without stopping the shared service itself."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._server: Any = None
        self._conns: list[Any] = []

    def start(self) -> None:
        import socket
        import threading

        server = socket.create_server(("127.0.0.1", self.port))  # sets SO_REUSEADDR: restartable
        self._server = server

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.close()

        def accept() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    conn.close()
                    continue
                self._conns += [conn, upstream]
                threading.Thread(target=pump, args=(conn, upstream), daemon=True).start()
                threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def stop(self) -> None:
        import socket

        if self._server is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not.
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
            self._server = None
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            except OSError:
                pass
        self._conns = []
