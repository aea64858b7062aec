"""Pure helpers of bench/operator_scale.py: process CPU/RSS from /proc text, Prometheus
histograms from exposition text, the API server's audit log counted per client, and the table.

Kept free of I/O so that tests/bench can check them against hand-computed values."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

CLOCK_TICKS = 100  # os.sysconf("SC_CLK_TCK") on Linux


@dataclass(frozen=True)
class ProcSample:
    """One reading of a process: when (monotonic s), CPU seconds used so far, resident bytes."""

    at: float
    cpu_seconds: float
    rss_bytes: int


def parse_proc(at: float, stat: str, status: str, ticks: int = CLOCK_TICKS) -> ProcSample:
    """A ProcSample from /proc/<pid>/stat and /proc/<pid>/status (utime + stime; VmRSS)."""
    fields = stat.rsplit(")", 1)[1].split()
    # After the command: state is field 3; utime and stime are fields 14 and 15 (1-based).
    utime, stime = int(fields[11]), int(fields[12])
    rss_kib = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
    return ProcSample(at, (utime + stime) / ticks, rss_kib * 1024)


def cpu_percent(first: ProcSample, last: ProcSample) -> float:
    """Mean CPU use between two samples, in % of one core."""
    span = last.at - first.at
    return 100.0 * (last.cpu_seconds - first.cpu_seconds) / span if span > 0 else 0.0


Buckets = dict[float, float]  # upper bound -> cumulative count


def histogram_buckets(exposition: str, name: str, labels: Mapping[str, str] | None = None) -> Buckets:
    """The cumulative buckets of histogram `name`, summed over every series whose labels include
    `labels` (e.g. all pools of a namespace)."""
    wanted = labels or {}
    out: Buckets = {}
    for family in text_string_to_metric_families(exposition):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name != f"{name}_bucket":
                continue
            if any(sample.labels.get(k) != v for k, v in wanted.items()):
                continue
            bound = float(sample.labels["le"])
            out[bound] = out.get(bound, 0.0) + sample.value
    return out


def bucket_delta(before: Buckets, after: Buckets) -> Buckets:
    """The observations made between two scrapes of the same histogram."""
    return {bound: count - before.get(bound, 0.0) for bound, count in after.items()}


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """As PromQL's histogram_quantile: linear within the bucket that holds the q-th observation;
    None without observations; the highest finite bound when it falls in the +Inf bucket."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return bounds[-1]


@dataclass(frozen=True)
class AuditCount:
    """Requests of one client to the API server, from its audit log (one JSON event per line)."""

    requests: int = 0
    status_writes: int = 0  # PATCH/PUT of agentpools/status
    by_verb: tuple[tuple[str, int], ...] = ()


def count_audit(lines: Iterable[str], username: str) -> AuditCount:
    """Count the events of `username` (stage ResponseComplete, or ResponseStarted for watches)."""
    requests = status_writes = 0
    verbs: dict[str, int] = {}
    for line in lines:
        if not line.strip():
            continue
        event = json.loads(line)
        if event.get("user", {}).get("username") != username:
            continue
        if event.get("stage") not in ("ResponseComplete", "ResponseStarted"):
            continue
        if event.get("stage") == "ResponseStarted" and event.get("verb") != "watch":
            continue
        if event.get("stage") == "ResponseComplete" and event.get("verb") == "watch":
            continue  # counted when it started
        verb = event.get("verb", "?")
        ref = event.get("objectRef") or {}
        requests += 1
        verbs[verb] = verbs.get(verb, 0) + 1
        if (
            verb in ("patch", "update")
            and ref.get("resource") == "agentpools"
            and ref.get("subresource") == "status"
        ):
            status_writes += 1
    return AuditCount(requests, status_writes, tuple(sorted(verbs.items())))


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A fixed-width text table, first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        return "  ".join(
            [str(first).ljust(widths[0]), *(str(c).rjust(w) for c, w in zip(rest, widths[1:], strict=True))]
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
