"""Memory admission: the agent cuts, then stops, new work as its RSS nears its cgroup limit,
without fighting the operator's right-sizer, which puts the p95 usage at targetUtilization."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis
from e2e.harness import async_eventually

from tars_agent import memory
from tars_agent.client import TaskClient
from tars_agent.memory import allowed_inflight
from tars_agent.mockllm import MockLLM
from tars_contract import contract

from .conftest import agent_settings, running_agent

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


async def test_an_agent_sees_its_new_limit_after_an_in_place_resize(
    redis_client: aioredis.Redis,
    redis_url: str,
    mock_llm: MockLLM,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limit_file = tmp_path / "memory.max"
    monkeypatch.setattr(memory, "CGROUP_V2_LIMIT", limit_file)
    monkeypatch.setattr(memory, "CGROUP_V1_LIMIT", tmp_path / "absent")
    # Started at a limit its RSS fills: it takes no work.
    limit_file.write_text(str(memory.process_rss()))
    settings = agent_settings(redis_url, mock_llm.url, concurrency=2, requests_per_minute=6000)
    client = TaskClient(redis_client, settings.namespace, settings.pool)
    async with running_agent(settings) as agent:
        await async_eventually(lambda: agent.free_slots == 0, 5, "the agent to admit no work at that limit")
        task_id = (
            await client.submit_payload({"messages": [{"role": "user", "content": "q"}]}, "normal")
        ).task_id
        # The kubelet resized the container in place: the agent must see it without a restart.
        limit_file.write_text(str(64 * GIB))
        assert (await client.wait(task_id, timeout_s=10)).status == "done"
