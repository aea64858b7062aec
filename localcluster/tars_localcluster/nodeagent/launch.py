"""Container launcher: the first program of every container process.

Run as `python -I launch.py NETNS CGROUP_DIR WORKDIR -- ARGV...` with the
container's final environment. It joins the pod's memory cgroup and network
namespace, gives itself a private mount namespace in which the container's
own cgroup is what /sys/fs/cgroup/memory shows (as a cgroup-v1 container sees
it, so a program can read its own memory limit), starts a new session (so the
node agent can signal the whole process group) and execs the command.

It is a separate program, not a preexec_fn: code between fork and exec in a
process with threads (the node agent's HTTP client has some) can deadlock.
Standard library only, because it runs with `-I`, before the container's
environment could confuse an interpreter.
"""

import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        sys.stderr.write(f"launch: {what} failed: {os.strerror(err)}\n")
        sys.exit(127)


def main() -> None:
    netns, cgroup_dir, workdir = sys.argv[1:4]
    if sys.argv[4] != "--":
        sys.stderr.write("usage: launch.py NETNS CGROUP_DIR WORKDIR -- ARGV...\n")
        sys.exit(127)
    argv = sys.argv[5:]
    libc = ctypes.CDLL(None, use_errno=True)
    with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    _check(libc.setns(fd, CLONE_NEWNET), f"entering network namespace {netns}")
    os.close(fd)
    _check(libc.unshare(CLONE_NEWNS), "unshare(mount namespace)")
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
    _check(
        libc.mount(cgroup_dir.encode(), b"/sys/fs/cgroup/memory", None, MS_BIND, None),
        "bind-mounting the container's memory cgroup",
    )
    os.setsid()
    if workdir:
        os.chdir(workdir)
    try:
        os.execve(argv[0], argv, os.environ)
    except OSError as exc:
        sys.stderr.write(f"launch: exec {argv[0]} failed: {exc}\n")
        sys.exit(127)


if __name__ == "__main__":
    main()
