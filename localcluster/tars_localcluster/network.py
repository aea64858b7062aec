"""Pod networking: a bridge on the host and one network namespace per pod.

Like a bridge CNI plugin: each pod gets a namespace ``tars-<id>`` with a veth
pair whose host end is enslaved to the bridge, an address from the pod CIDR
and a default route via the bridge address. Pods therefore have their own
addresses (two pods can both listen on :8080), the host reaches them directly,
and they reach services the host offers on the bridge address. Nothing here
routes beyond this machine: no NAT or forwarding to other interfaces is set up.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
from pathlib import Path

from tars_localcluster.procs import ClusterError, run

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000


def ensure_bridge(bridge: str, gateway_ip: str, prefix_len: int) -> None:
    if run(["ip", "link", "show", bridge], check=False).returncode != 0:
        run(["ip", "link", "add", bridge, "type", "bridge"])
    addrs = run(["ip", "-o", "-4", "addr", "show", "dev", bridge]).stdout
    if f" {gateway_ip}/{prefix_len} " not in addrs:
        run(["ip", "addr", "add", f"{gateway_ip}/{prefix_len}", "dev", bridge])
    run(["ip", "link", "set", bridge, "up"])


def delete_bridge(bridge: str) -> None:
    if run(["ip", "link", "show", bridge], check=False).returncode == 0:
        run(["ip", "link", "del", bridge])


def netns_name(prefix: str, pod_uid: str) -> str:
    return prefix + pod_uid.replace("-", "")[:12]


def _veth_name(ns: str) -> str:
    # Interface names are limited to 15 characters.
    return "v" + hashlib.sha1(ns.encode()).hexdigest()[:11]


def create_pod_netns(ns: str, bridge: str, ip: str, prefix_len: int, gateway_ip: str) -> None:
    delete_pod_netns(ns)
    veth = _veth_name(ns)
    run(["ip", "netns", "add", ns])
    try:
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        run(["ip", "link", "set", veth, "master", bridge, "up"])
        run(["ip", "-n", ns, "addr", "add", f"{ip}/{prefix_len}", "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "-n", ns, "route", "add", "default", "via", gateway_ip])
    except ClusterError:
        delete_pod_netns(ns)
        raise


def delete_pod_netns(ns: str) -> None:
    if (NETNS_DIR / ns).exists():
        run(["ip", "netns", "del", ns], check=False)
    # The host end normally vanishes with the namespace; remove a leftover one.
    veth = _veth_name(ns)
    if run(["ip", "link", "show", veth], check=False).returncode == 0:
        run(["ip", "link", "del", veth], check=False)


def list_netns(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def enter_netns(ns: str) -> None:
    """Move the calling process into network namespace `ns` (used in a child
    between fork and exec; Python 3.11 has no os.setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}) failed: {os.strerror(err)}")
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
