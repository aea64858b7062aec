"""Start, find and stop the cluster's daemons through pid files.

Each daemon runs in its own session (process group), so stopping it also
stops whatever it spawned."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


class ClusterError(RuntimeError):
    """A failure with a message that names the cause and the fix."""


# The Debian package that has each tool the cluster and its image builds run.
TOOL_PACKAGES = {
    "ip": "iproute2",
    "nft": "nftables",
    "runc": "runc",
    "mount": "mount",
    "buildah": "buildah",
    "umoci": "umoci",
    "mmdebstrap": "mmdebstrap",
    "gcc": "gcc libc6-dev",
    "ldd": "libc-bin",
    "ctr": "containerd",
}


def exit_code(prefix: str, command: Callable[[], int | None]) -> int:
    """Run a command-line command: a ClusterError becomes one line naming cause and fix, exit 1."""
    try:
        return command() or 0
    except ClusterError as exc:
        print(f"[{prefix}] ERROR: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def require_tool(tool: str, error: type[ClusterError] = ClusterError) -> str:
    """The tool's path; else `error` naming the Debian package to install."""
    path = shutil.which(tool)
    if path is None:
        package = TOOL_PACKAGES.get(tool, tool)
        raise error(f"`{tool}` is missing; run `make setup` or install it with: apt-get install -y {package}")
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) is not alive for our purposes.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


class Daemon:
    def __init__(self, name: str, run_dir: Path, log_dir: Path) -> None:
        self.name = name
        self.pid_file = run_dir / f"{name}.pid"
        self.spec_file = run_dir / f"{name}.spec"
        self.log_file = log_dir / f"{name}.log"

    def started_spec(self) -> str | None:
        """The spec (command, configuration, binary) the running process was started with."""
        try:
            return self.spec_file.read_text()
        except FileNotFoundError:
            return None

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def start(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        spec: str = "",
    ) -> int:
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        if not Path(argv[0]).exists():
            raise ClusterError(
                f"{self.name}: binary {argv[0]} is missing; run `make cluster-build` to build it"
            )
        with self.log_file.open("ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        self.spec_file.write_text(spec)
        return proc.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, timeout: float = 15.0) -> bool:
        """SIGTERM the daemon's process group, SIGKILL it after `timeout`."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True


def wait_for(what: str, check: Callable[[], bool], timeout: float, daemon: Daemon | None = None) -> float:
    """Poll `check` until it is true; fail naming `what` and the daemon's log."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        if daemon is not None and daemon.pid() is None:
            raise ClusterError(
                f"{daemon.name} exited while waiting for {what}; its log ends:\n{daemon.log_tail()}"
            )
        try:
            if check():
                return time.monotonic() - start
        except Exception:  # noqa: BLE001 - any failure of a probe means "not yet"
            pass
        time.sleep(0.2)
    tail = f"; {daemon.name}'s log ends:\n{daemon.log_tail()}" if daemon else ""
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")


def port_in_use(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def run(
    argv: Sequence[str], check: bool = True, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, input=stdin, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"`{' '.join(argv)}` did not finish within {timeout:.0f}s") from exc
    if check and proc.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc
