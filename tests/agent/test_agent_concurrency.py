"""An agent runs as many upstream requests at once as its concurrency allows."""

from __future__ import annotations

import redis.asyncio as aioredis
from e2e.harness import async_eventually

from tars_agent.client import TaskClient
from tars_agent.mockllm import MockLLM
from tars_contract import metric_names as m

from .conftest import agent_settings, running_agent


async def test_every_slot_has_its_upstream_request_in_flight_beyond_64(
    redis_client: aioredis.Redis, redis_url: str, mock_llm: MockLLM
) -> None:
    mock_llm.config.latency_s = 15.0  # no answer before every request arrived, even on a busy machine
    slots = 80  # above the HTTP client's former fixed pool of 64 connections
    settings = agent_settings(redis_url, mock_llm.url, concurrency=slots)
    client = TaskClient(redis_client, settings.namespace, settings.pool)
    async with running_agent(settings) as agent:
        for i in range(slots):
            await client.submit_payload({"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 4})

        def admitted_and_done() -> tuple[int, float] | None:
            done = agent.metrics.registry.get_sample_value(m.TASKS_TOTAL, {"outcome": "done"})
            return (len(mock_llm.admitted), done or 0.0) if len(mock_llm.admitted) == slots else None

        # all of them reached the upstream while the first answers were still 15 s away
        assert await async_eventually(admitted_and_done, 60, f"{slots} requests upstream") == (slots, 0.0)
