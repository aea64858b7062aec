"""The node's cgroup parent (the kubelet's cgroupRoot) in every hierarchy of the host.

The kubelet (cgroupfs driver) puts every pod below one parent; giving it a parent
of its own keeps the node's cgroups apart from the host's and lets `down` find and
remove all of them, in the v1 hierarchies and the hybrid host's unified one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

CGROUP_FS = Path("/sys/fs/cgroup")


def _mounts() -> list[tuple[Path, str, list[str]]]:
    """(mount point, "cgroup" or "cgroup2", mount options) of every cgroup hierarchy below
    /sys/fs/cgroup."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[2] in ("cgroup", "cgroup2") and fields[1].startswith(str(CGROUP_FS)):
            found.append((Path(fields[1]), fields[2], fields[3].split(",")))
    return found


def hierarchies() -> list[Path]:
    """Every cgroup hierarchy mounted below /sys/fs/cgroup (v1 controllers and unified)."""
    return sorted({path for path, _, _ in _mounts()})


def ensure_parent(name: str) -> None:
    """Create the parent everywhere; a new cpuset cgroup needs its cpus and mems before use."""
    for root in hierarchies():
        parent = root / name
        parent.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if (parent / knob).exists() and not (parent / knob).read_text().strip():
                (parent / knob).write_text((root / knob).read_text())


def cpu_hierarchies() -> list[Path]:
    """The hierarchies that hold the cpu controller: v1's cpu mount, else the unified one."""
    mounts = _mounts()
    v1 = {path for path, kind, options in mounts if kind == "cgroup" and "cpu" in options}
    unified = {
        path
        for path, kind, _ in mounts
        if kind == "cgroup2" and "cpu" in _read(path / "cgroup.controllers").split()
    }
    return sorted(v1 or unified)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def enter_cpu_group(name: str, pid: int) -> None:
    """Move `pid` (the children it forks later follow it) into CPU cgroup `name` below the root.

    Started from a shell, the node's daemons sat in the root CPU cgroup, where each busy thread
    weighs as much as the pods' whole parent: while a pod started, the API server, etcd, the
    kubelet and containerd took the running pods' CPU. On a systemd node they share
    system.slice, beside kubepods. Only the CPU controller's hierarchy: the daemons' memory and
    other accounting stays where it was."""
    for root in cpu_hierarchies():
        group = root / name
        try:
            group.mkdir(exist_ok=True)
            (group / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            raise OSError(f"cannot move pid {pid} into CPU cgroup {group}: {exc}") from exc


def weigh_like_pods(name: str) -> None:
    """Give parent `name` the CPU weight the kubelet gave its kubepods (cpu.shares of the node's
    CPUs, 2048 on 2 cores; cpu.weight on a unified host), which exists once the kubelet runs.

    On a systemd node kubepods.slice sits at the root with that weight, beside system.slice's
    1024: below a parent of the default weight, the pods together weighed only as much as the
    node's daemons, and every pod start took the running pods' CPU."""
    for root in cpu_hierarchies():
        parent = root / name
        knob = "cpu.shares" if (parent / "cpu.shares").exists() else "cpu.weight"
        try:
            (parent / knob).write_text((parent / "kubepods" / knob).read_text())
        except OSError as exc:
            raise OSError(f"cannot give {parent} the CPU weight of its kubepods: {exc}") from exc


def kill(cgroup: Path) -> None:
    """SIGKILL every process in a cgroup."""
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


def remove_parent(name: str) -> list[Path]:
    """Remove the parent (and every pod's cgroup below it) from every hierarchy."""
    busy: list[Path] = []
    for root in hierarchies():
        busy += remove_tree(root / name)
    return busy


def existing(name: str) -> list[Path]:
    return [root / name for root in hierarchies() if (root / name).exists()]
