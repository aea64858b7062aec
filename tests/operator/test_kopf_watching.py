"""handlers.configure_kopf: what kopf asks the API server for when it lists and watches; and
handlers.configure_memory."""

from __future__ import annotations

import gc
import platform
import subprocess
import sys

import kopf
import pytest

from tars_contract import contract
from tars_operator import models
from tars_operator.handlers import POD_LIST_CHUNK, WORKER_IDLE_S, configure_kopf, configure_memory

PODS = kopf.Resource("", "v1", "pods", kind="Pod", namespaced=True)
AGENT_POOLS = kopf.Resource(models.GROUP, models.VERSION, models.PLURAL, kind=models.KIND, namespaced=True)


def test_only_agent_pods_are_listed_and_watched_and_in_chunks() -> None:
    settings = kopf.OperatorSettings()
    assert settings.watching.label_selectors.collect(PODS) == [], "kopf's default: every pod"
    configure_kopf(settings)
    # Filtered by the API server (a label selector on the list and watch), not by kopf after it
    # received every pod of the cluster.
    assert settings.watching.label_selectors.collect(PODS) == [contract.POOL_LABEL]
    assert settings.watching.label_selectors.collect(AGENT_POOLS) == [], "every pool is ours"
    assert settings.watching.chunk_size == POD_LIST_CHUNK
    # kopf's worker per object holds its last event (the whole pod) until idle for this long.
    assert settings.queueing.idle_timeout == WORKER_IDLE_S < kopf.OperatorSettings().queueing.idle_timeout


def test_after_startup_the_collector_leaves_what_lives_forever_alone() -> None:
    try:
        configure_memory()
        assert gc.get_freeze_count() > 0, "imported modules, classes and functions are frozen"
    finally:
        gc.unfreeze()


# In a process of its own (glibc's settings are per process): RssAnon grown in KiB after 40 bodies
# of 1 MiB, each followed by a block that lives on, are freed.
_BODIES_FREED = """
from tars_operator import handlers

def rss_anon_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))

handlers.configure_memory()
first = b"x" * (4 << 20)  # one big body freed (by default glibc's threshold then follows it up)
del first
before = rss_anon_kib()
bodies, kept = [], []
for _ in range(40):
    bodies.append(b"x" * (1 << 20))
    kept.append(b"y" * 100_000)
del bodies
print(rss_anon_kib() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_after_startup_large_blocks_freed_go_back_to_the_system() -> None:
    # By default glibc carved these bodies from its heap, between blocks still in use, and kept
    # the 40 MiB once they were freed.
    out = subprocess.run([sys.executable, "-c", _BODIES_FREED], capture_output=True, text=True, check=True)
    grown_kib = int(out.stdout)
    assert grown_kib < 10 * 1024, f"{grown_kib} KiB still held"
