"""Memory cgroups (v1) of pods and containers."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def oom_kills(cgroup: Path) -> int:
    """How many processes the kernel's OOM killer has killed in `cgroup`."""
    try:
        for line in (cgroup / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except OSError:
        pass
    return 0


def kill(cgroup: Path) -> None:
    """SIGKILL every process in a cgroup, also those that left the process group."""
    with contextlib.suppress(OSError):
        for pid in (cgroup / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def remove_tree(root: Path, timeout: float = 10.0) -> list[Path]:
    """Kill every process below `root` and remove its cgroups, deepest first.
    Returns the cgroups still busy after `timeout`."""
    if not root.exists():
        return []
    cgroups = sorted((p for p in [root, *root.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts))
    deadline = time.monotonic() + timeout
    busy = []
    for cgroup in cgroups:
        while cgroup.exists():
            kill(cgroup)
            try:
                cgroup.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    busy.append(cgroup)
                    break
                time.sleep(0.05)
    return busy
