"""What an agent keeps of the tasks it finished: nothing that grows with their number."""

from __future__ import annotations

import tracemalloc

import redis.asyncio as aioredis

from tars_agent import tasks
from tars_agent.client import TaskClient
from tars_agent.mockllm import MockLLM

from .conftest import agent_settings, running_agent

TASKS = 300


async def test_parsing_queued_tasks_keeps_none_of_their_strings(
    redis_client: aioredis.Redis, redis_url: str, mock_llm: MockLLM
) -> None:
    """Each task's payload is parsed once (tasks.parse_task). pydantic-core's JSON string cache,
    on by default, keeps its unique strings (the id) after the task is gone: ~80 bytes a task in
    a process-wide cache of 16,384 slots, RSS growth over a soak's first ~50,000 tasks."""
    mock_llm.config.response_tokens = 2
    settings = agent_settings(redis_url, mock_llm.url, concurrency=50)
    client = TaskClient(redis_client, settings.namespace, settings.pool)
    payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    # Three frames reach parse_task from pydantic-core's allocations. Strings the cache held before
    # are untraced, so what a parse added is counted whatever earlier tests left in it.
    tracemalloc.start(3)
    try:
        async with running_agent(settings):
            ids = [(await client.submit_payload(payload)).task_id for _ in range(TASKS)]
            for task_id in ids:
                assert (await client.wait(task_id, timeout_s=60)).status == "done"
        # the agent stopped: none of its tasks is referenced any more
        held = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, tasks.__file__, all_frames=True)]
        )
    finally:
        tracemalloc.stop()
    blocks = sum(stat.count for stat in held.statistics("filename"))
    assert blocks < TASKS // 10, f"{blocks} blocks allocated parsing {TASKS} finished tasks are still held"
