"""Memory admission: the agent cuts, then stops, new work as its RSS nears its cgroup limit,
without fighting the operator's right-sizer, which puts the p95 usage at targetUtilization."""

from __future__ import annotations

import pytest

from tars_agent import contract
from tars_agent.memory import allowed_inflight

GIB = 1 << 30


def test_memory_thresholds_cut_concurrency_then_stop_new_work() -> None:
    assert allowed_inflight(GIB // 4, GIB, 8) == 8
    assert allowed_inflight(int(GIB * 0.85), GIB, 8) == 4
    assert allowed_inflight(int(GIB * 0.9) + 1, GIB, 8) == 0
    assert allowed_inflight(10 * GIB, None, 8) == 8


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7, contract.MAX_MEMORY_TARGET_UTILIZATION])
def test_an_agent_right_sized_at_any_allowed_target_takes_full_work_at_that_usage(target: float) -> None:
    # With both at 0.7, an agent right-sized by the operator refused all work at its usual usage.
    assert allowed_inflight(int(GIB * target), GIB, 8) == 8
