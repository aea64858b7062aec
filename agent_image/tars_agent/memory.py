"""Memory-aware admission: how many tasks an agent may hold given its RSS and cgroup limit.

As a share of the container's memory limit: below 80 % the full concurrency, from
80 % half of it, from 90 % no new work (in-flight tasks still finish). The operator's
right-sizer aims the p95 usage at memory.targetUtilization (at most 75 %), so a
right-sized agent works at full concurrency (contract.py holds the numbers).
"""

from __future__ import annotations

import os
from pathlib import Path

from tars_contract import contract

CGROUP_V2_LIMIT = Path("/sys/fs/cgroup/memory.max")
CGROUP_V1_LIMIT = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")
_V1_UNLIMITED = 1 << 60  # v1 reports "no limit" as a huge page-aligned number


def allowed_inflight(rss_bytes: int, limit_bytes: int | None, concurrency: int) -> int:
    if not limit_bytes:
        return concurrency
    used = rss_bytes / limit_bytes
    if used >= contract.MEMORY_STOP_AT:
        return 0
    if used >= contract.MEMORY_HALF_AT:
        return max(concurrency // 2, 1)
    return concurrency


def cgroup_memory_limit(v2: Path | None = None, v1: Path | None = None) -> int | None:
    """The container's memory limit in bytes, None when unlimited or not in a cgroup.

    Read anew on each call: an in-place resize changes it under a running agent."""
    for path in (v2 or CGROUP_V2_LIMIT, v1 or CGROUP_V1_LIMIT):
        try:
            raw = path.read_text().strip()
        except OSError:
            continue
        if raw == "max":
            return None
        value = int(raw)
        return None if value >= _V1_UNLIMITED else value
    return None


def process_rss() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
