"""The pure parts of bench/warm_pickup.py (pickup_stats) and bench/agent_memory.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from agent_memory import mb_per_inflight, memory_mb, slope_mb_per_hour
from pickup_stats import (
    CpuReading,
    PoolSample,
    comparison,
    cpu_share,
    is_live,
    max_excess,
    pickup_s,
    quantiles,
    refill,
)
from tars_contract import contract


def test_pickup_is_the_start_events_ms_less_the_submit_time() -> None:
    assert pickup_s(1000.0041, "1000012-0") == pytest.approx(0.0079)
    assert pickup_s(1000.0, "1000000-3") == 0.0


@pytest.mark.parametrize(
    ("pod", "live"),
    [
        ({"metadata": {}, "status": {"phase": "Running"}}, True),
        ({"metadata": {}, "status": {"phase": "Pending"}}, True),  # starting pods count
        ({"metadata": {"deletionTimestamp": "2026-11-28T12:00:00Z"}, "status": {"phase": "Running"}}, False),
        ({"metadata": {"annotations": {contract.DRAINING_ANNOTATION: "x"}}, "status": {}}, False),
        ({"metadata": {}, "status": {"phase": "Failed"}}, False),
    ],
)
def test_live_pods_follow_the_operators_rule(pod: dict[str, dict[str, object]], live: bool) -> None:
    assert is_live(pod) is live


def sample(live: int, desired: int | None, surge: int = 1) -> PoolSample:
    return PoolSample(t=0.0, pods=live, live=live, ready=live, desired=desired, warm=None, surge=surge)


def test_excess_is_live_over_desired_plus_surge_and_ignores_samples_before_a_decision() -> None:
    assert max_excess([sample(4, None), sample(4, 4), sample(5, 4), sample(3, 4)]) == 0
    assert max_excess([sample(7, 4), sample(4, 4)]) == 2
    assert max_excess([sample(4, None)]) is None


def test_refill_rate_counts_ready_agents_over_the_time_to_the_last_one() -> None:
    got = refill(100.0, [100.5, 100.6, 101.0, 101.2], [102.0, 103.0, 104.0, 104.0])
    assert got == {
        "new_agents": 4.0,
        "ready": 4.0,
        "first_ready_s": 2.0,
        "last_ready_s": 4.0,
        "agents_per_s": 1.0,
    }
    assert refill(100.0, [], []) == {"new_agents": 0.0, "ready": 0.0}


def test_the_comparison_says_which_targets_were_met() -> None:
    warm = quantiles([0.004] * 98 + [0.020, 0.040])  # p50 4 ms, p99 20 ms
    burst = quantiles([0.5, 0.9, 1.5])
    table = comparison(warm, burst, 2.0, 0, {"p50": 0.005, "p99": 0.025})
    rows = {line.split("  ")[0]: line for line in table.splitlines()}
    assert rows["warm pickup p50 at 45/s"].endswith("met") and "4.0 ms" in rows["warm pickup p50 at 45/s"]
    assert rows["warm pickup p99 at 45/s"].endswith("met")
    assert rows["300-task burst pickup p50"].endswith("met")
    assert "500x" in rows["warm faster than cold (p50 ratio)"]
    assert comparison(warm, burst, 0.1, 3, {}).count("MISSED") == 2  # 25x, and 3 pods too many


def test_memory_per_inflight_request_and_soak_slope() -> None:
    assert mb_per_inflight(60.0, 68.0, 100) == pytest.approx(0.08)
    flat = [(t * 10.0, 70.0) for t in range(10)]
    assert slope_mb_per_hour(flat, 0) == 0
    growing = [(t * 360.0, 70.0 + t) for t in range(10)]  # +1 MB every 6 min
    assert slope_mb_per_hour(growing, 0) == pytest.approx(10.0)
    # warm-up samples are not fitted: a start-up jump does not read as growth
    assert slope_mb_per_hour([(0.0, 10.0), *[(300.0 + t, 70.0) for t in range(5)]], 300) == 0
    assert slope_mb_per_hour(flat[:2], 0) is None


def test_memory_is_read_from_status_and_smaps_rollup() -> None:
    status = "Name:\tpython\nVmRSS:\t   71680 kB\nThreads:\t3\n"
    assert memory_mb(status, "Rss: 71680 kB\nPss:   51200 kB\n") == (70.0, 50.0)
    assert memory_mb(status, None) == (70.0, None)
    with pytest.raises(ValueError, match="VmRSS"):
        memory_mb("Name:\tzombie\n", None)


def test_the_cpu_share_splits_the_machines_busy_cores_into_the_pods_and_the_rest() -> None:
    got = cpu_share(CpuReading(10.0, 100.0, 40.0), CpuReading(12.0, 103.8, 41.6))
    assert got == pytest.approx({"seconds": 2.0, "machine_cores": 1.9, "pods_cores": 0.8, "rest_cores": 1.1})
