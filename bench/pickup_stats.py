"""The pure parts of bench/warm_pickup.py: pickup latencies, live pods against desired + surge,
refill rate, and the side-by-side table against agent-sandbox's published figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from limiter_stats import percentile
from tars_contract import contract

# kubernetes-sigs/agent-sandbox's published warm-pool figures (seconds) and this targets.
SANDBOX_WARM_P50_S, SANDBOX_WARM_P99_S = 0.092, 0.376  # at 45 claims/s
SANDBOX_BURST_P50_S = 1.47  # 300-claim burst
SANDBOX_COLD_S = (42.0, 50.0)
SANDBOX_OVERSHOOT = "4.5-5.5x its target"
TARGET_WARM_P50_S, TARGET_WARM_P99_S = 0.010, 0.030
TARGET_BURST_P50_S = 1.0
TARGET_COLD_OVER_WARM = 50.0


def entry_ms(stream_id: str) -> int:
    """The Redis clock (ms) a stream id was created at."""
    return int(stream_id.split("-", 1)[0])


def pickup_s(submitted_at: float, start_event_id: str) -> float:
    """submit -> first attempt start, both on Redis' clock: the task hash's `submitted_at` (s, from
    TIME in the submit script) and the id of the task's first "start" event (ms)."""
    return entry_ms(start_event_id) / 1000 - submitted_at


def is_live(pod: Mapping[str, Any]) -> bool:
    """A pod that counts against the pool's size: not finished, not terminating, not draining
    (the operator's own rule, tars_operator.policy.observe)."""
    meta, status = pod.get("metadata", {}), pod.get("status", {})
    if status.get("phase") in ("Succeeded", "Failed") or meta.get("deletionTimestamp"):
        return False
    return contract.DRAINING_ANNOTATION not in (meta.get("annotations") or {})


@dataclass(frozen=True)
class PoolSample:
    t: float  # host clock, s
    pods: int  # all pod objects of the pool (terminating ones too)
    live: int
    ready: int
    desired: int | None  # status.desiredReplicas (None before the first decision)
    warm: int | None  # status.warm
    surge: int  # spec.rotation.maxUnavailable
    queue: float | None = None  # status.queueDepth, what the operator planned with

    @property
    def excess(self) -> int | None:
        """live - (desired + surge): above 0 means more pods than the pool may ever have."""
        return None if self.desired is None else self.live - (self.desired + self.surge)


@dataclass(frozen=True)
class CpuReading:
    """Cumulative CPU seconds at one instant: the whole machine busy (/proc/stat: all but idle and
    iowait) and the node's pods (their cgroup parent's usage)."""

    t: float  # monotonic, s
    machine_busy_s: float
    pods_s: float


def cpu_share(before: CpuReading, after: CpuReading) -> dict[str, float]:
    """Cores busy between two readings: the machine's, the pods', and the rest (the node's daemons,
    the kernel, this benchmark)."""
    span = after.t - before.t
    machine = (after.machine_busy_s - before.machine_busy_s) / span
    pods = (after.pods_s - before.pods_s) / span
    return {"seconds": span, "machine_cores": machine, "pods_cores": pods, "rest_cores": machine - pods}


def max_excess(samples: Sequence[PoolSample]) -> int | None:
    values = [s.excess for s in samples if s.excess is not None]
    return max(values) if values else None


def refill(started: float, created: Sequence[float], ready: Sequence[float]) -> dict[str, float]:
    """New agents after `started` (host clock): how many, first and last Ready, and agents/s
    (Ready agents over the time from `started` to the last of them)."""
    if not ready:
        return {"new_agents": float(len(created)), "ready": 0.0}
    last = max(ready) - started
    return {
        "new_agents": float(len(created)),
        "ready": float(len(ready)),
        "first_ready_s": min(ready) - started,
        "last_ready_s": last,
        "agents_per_s": len(ready) / last if last > 0 else float("inf"),
    }


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """n, p50, p90, p99 (nearest rank) and max of a non-empty sample."""
    if not values:
        raise ValueError("no values: nothing was measured")
    ranked = {f"p{p}": percentile(values, p) or 0.0 for p in (50, 90, 99)}
    return {"n": float(len(values)), **ranked, "max": max(values)}


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def comparison(
    warm: Mapping[str, float],
    burst: Mapping[str, float],
    cold_first_task_p50_s: float | None,
    excess: int | None,
    prometheus: Mapping[str, float | None],
) -> str:
    """The side-by-side table: ours, agent-sandbox's published figure, the target."""
    ratio = cold_first_task_p50_s / warm["p50"] if cold_first_task_p50_s and warm["p50"] > 0 else None
    rows = [
        (
            "warm pickup p50 at 45/s",
            ms(warm["p50"]),
            ms(SANDBOX_WARM_P50_S),
            "<= 10 ms",
            verdict(warm["p50"] <= TARGET_WARM_P50_S),
        ),
        (
            "warm pickup p99 at 45/s",
            ms(warm["p99"]),
            ms(SANDBOX_WARM_P99_S),
            "<= 30 ms",
            verdict(warm["p99"] <= TARGET_WARM_P99_S),
        ),
        (
            "  (agents' histogram via Prometheus p50/p99)",
            f"{ms(prometheus.get('p50'))} / {ms(prometheus.get('p99'))}",
            "",
            "",
            "",
        ),
        (
            "300-task burst pickup p50",
            f"{burst['p50']:.2f} s",
            f"{SANDBOX_BURST_P50_S:.2f} s",
            "<= 1 s",
            verdict(burst["p50"] <= TARGET_BURST_P50_S),
        ),
        ("300-task burst pickup p99", f"{burst['p99']:.2f} s", "", "", ""),
        (
            "cold: pod create -> first task (p50)",
            f"{cold_first_task_p50_s:.2f} s" if cold_first_task_p50_s else "n/a",
            f"{SANDBOX_COLD_S[0]:.0f}-{SANDBOX_COLD_S[1]:.0f} s",
            "",
            "",
        ),
        (
            "warm faster than cold (p50 ratio)",
            f"{ratio:.0f}x" if ratio else "n/a",
            "",
            ">= 50x",
            verdict(ratio is not None and ratio >= TARGET_COLD_OVER_WARM),
        ),
        (
            "max(live - (desired + surge)) sampled",
            "n/a" if excess is None else str(excess),
            SANDBOX_OVERSHOOT,
            "<= 0",
            verdict(excess is not None and excess <= 0),
        ),
    ]
    header = ("", "tars (this run)", "agent-sandbox", "target", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
