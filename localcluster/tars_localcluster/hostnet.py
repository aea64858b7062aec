"""The host side of the node's network: the bridge, forwarding confined to it, and the
kernel settings the node changes, recorded first and restored on `down`.

Pods sit on one bridge (the CNI bridge plugin adds their veths to it). A Service
connection from a pod is routed through the host (kube-proxy's DNAT), so IPv4
forwarding must be on; a filter of our own then drops every forwarded packet that
does not both enter and leave through the bridge, so that nothing from a pod is
ever routed beyond this machine.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from tars_localcluster.procs import ClusterError, run

# Kernel settings the node's parts write (forwarding: us; the rest: the kubelet's
# kernel defaults and kube-proxy), restored on `down`.
SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
PROC_SYS = Path("/proc/sys")


def ensure_bridge(bridge: str, gateway_ip: str, prefix_len: int) -> None:
    """The bridge exists before the first pod: the API server and the kubelet listen on its address."""
    if run(["ip", "link", "show", bridge], check=False).returncode != 0:
        run(["ip", "link", "add", bridge, "type", "bridge"])
    addrs = run(["ip", "-o", "-4", "addr", "show", "dev", bridge]).stdout
    if f" {gateway_ip}/{prefix_len} " not in addrs:
        run(["ip", "addr", "add", f"{gateway_ip}/{prefix_len}", "dev", bridge])
    run(["ip", "link", "set", bridge, "up"])


def delete_bridge(bridge: str) -> None:
    """The bridge and whatever veth is still attached to it."""
    for veth in bridge_ports(bridge):
        run(["ip", "link", "del", veth], check=False)
    if run(["ip", "link", "show", bridge], check=False).returncode == 0:
        run(["ip", "link", "del", bridge])


def bridge_ports(bridge: str) -> list[str]:
    proc = run(["ip", "-o", "link", "show", "master", bridge], check=False)
    if proc.returncode != 0:
        return []
    return [line.split(":")[1].strip().split("@")[0] for line in proc.stdout.splitlines() if ":" in line]


def forward_filter(table: str, bridge: str) -> str:
    """nft script: forwarded traffic stays on the bridge (pod <-> pod, pod <-> Service)."""
    return f"""\
table inet {table} {{
  chain forward {{
    type filter hook forward priority -10; policy accept;
    iifname "{bridge}" oifname "{bridge}" accept
    iifname "{bridge}" counter drop comment "pods reach nothing beyond this machine"
    oifname "{bridge}" counter drop comment "nothing from elsewhere is routed to pods"
  }}
}}
"""


def ensure_forward_filter(table: str, bridge: str) -> None:
    run(["nft", "delete", "table", "inet", table], check=False)
    proc = run(["nft", "-f", "-"], check=False, stdin=forward_filter(table, bridge))
    if proc.returncode != 0:
        raise ClusterError(
            f"nft could not load the forward filter: {proc.stderr.strip()}; is nftables installed?"
        )


def delete_forward_filter(table: str) -> None:
    run(["nft", "delete", "table", "inet", table], check=False)


def nft_tables() -> list[str]:
    """Every nftables table as "family name"."""
    out = run(["nft", "list", "tables"], check=False).stdout
    return [line.removeprefix("table ").strip() for line in out.splitlines() if line.startswith("table ")]


IPTABLES = ("iptables", "ip6tables")
IPTABLES_TABLES = ("filter", "nat", "mangle")


def record_nft_tables(path: Path) -> None:
    """Remember which nftables tables the host had before the node (once, like the sysctls)."""
    if not path.exists():
        path.write_text(json.dumps(nft_tables()))


def iptables_rules(prefix: str) -> list[str]:
    """The kubelet's iptables chains (it makes its canary and firewall chains even when kube-proxy
    uses nftables), as `<command> -t <table> <rule>` lines."""
    found = []
    for command in IPTABLES:
        for table in IPTABLES_TABLES:
            out = run([command, "-t", table, "-S"], check=False).stdout
            found += [f"{command} -t {table} {line}" for line in out.splitlines() if prefix in line]
    return found


def remove_iptables_chains(prefix: str) -> None:
    """Remove every iptables chain named `prefix`... and every rule that jumps to one."""
    for command in IPTABLES:
        for table in IPTABLES_TABLES:
            rules = run([command, "-t", table, "-S"], check=False).stdout.splitlines()
            for rule in rules:
                parts = rule.split()
                if parts[:1] == ["-A"] and not parts[1].startswith(prefix) and f"-j {prefix}" in rule:
                    run([command, "-t", table, "-D", *parts[1:]], check=False)
            chains = [r.split()[1] for r in rules if r.startswith(f"-N {prefix}")]
            for chain in chains:
                run([command, "-t", table, "-F", chain], check=False)
            for chain in chains:
                run([command, "-t", table, "-X", chain], check=False)


def delete_new_tables(path: Path) -> None:
    """Delete the nftables tables made while the node ran (iptables-nft makes them on first use)."""
    if not path.exists():
        return
    before = set(json.loads(path.read_text()))
    for table in nft_tables():
        if table not in before:
            family, name = table.split(" ", 1)
            run(["nft", "delete", "table", family, name], check=False)
    path.unlink()


def new_tables(path: Path) -> list[str]:
    if not path.exists():
        return []
    before = set(json.loads(path.read_text()))
    return [t for t in nft_tables() if t not in before]


def read_sysctl(name: str) -> str | None:
    try:
        return (PROC_SYS / name).read_text().strip()
    except OSError:
        return None


def write_sysctl(name: str, value: str) -> None:
    (PROC_SYS / name).write_text(value + "\n")


def record_sysctls(path: Path) -> None:
    """Remember the host's values once (a second `up` must not record the node's own)."""
    if path.exists():
        return
    values = {name: read_sysctl(name) for name in SYSCTLS}
    path.write_text(json.dumps({k: v for k, v in values.items() if v is not None}, indent=2))


def restore_sysctls(path: Path) -> list[str]:
    """Put the recorded values back; return those that differ from the record afterwards."""
    if not path.exists():
        return []
    recorded: dict[str, str] = json.loads(path.read_text())
    for name, value in recorded.items():
        if read_sysctl(name) != value:
            with contextlib.suppress(OSError):
                write_sysctl(name, value)
    changed = [name for name, value in recorded.items() if read_sysctl(name) != value]
    if not changed:
        path.unlink()
    return changed


def changed_sysctls(path: Path) -> list[str]:
    if not path.exists():
        return []
    recorded: dict[str, str] = json.loads(path.read_text())
    return [f"{n}={read_sysctl(n)} (was {v})" for n, v in recorded.items() if read_sysctl(n) != v]
