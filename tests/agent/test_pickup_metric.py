"""tars_task_pickup_seconds: queued -> attempt start on Redis' clock, per priority, once per attempt."""

from __future__ import annotations

import redis.asyncio as aioredis
from e2e.harness import async_eventually

from tars_agent.client import TaskClient
from tars_agent.mockllm import POISON_MARKER, MockLLM
from tars_agent.worker import Agent
from tars_contract import metric_names as m

from .conftest import agent_settings, running_agent

GAP_S = 0.05  # how long a task waits in the queue before the agent starts


def task(text: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 4}


def pickup(agent: Agent, priority: str, sample: str) -> float:
    value = agent.metrics.registry.get_sample_value(
        f"{m.TASK_PICKUP_SECONDS}_{sample}", {"priority": priority}
    )
    return value or 0.0


async def start_events_s(redis: aioredis.Redis, client: TaskClient, task_id: str) -> list[float]:
    """Redis' clock (s) of each attempt's "start" event: its stream id."""
    events = await redis.xrange(client.keys.chunks(task_id))
    return [int(eid.split("-")[0]) / 1000 for eid, fields in events if fields.get("event") == "start"]


async def test_pickup_is_the_gap_from_the_queue_entry_to_the_attempt_start_under_its_priority(
    redis_client: aioredis.Redis, redis_url: str, mock_llm: MockLLM
) -> None:
    settings = agent_settings(redis_url, mock_llm.url)
    client = TaskClient(redis_client, settings.namespace, settings.pool)
    # Queued GAP_S before any agent runs (an in-process agent's start-up alone can take as little
    # as 10 ms): the gap the metric must show, on Redis' clock, which stamps the entry id.
    task_id = (await client.submit_payload(task("waiting"), "high")).task_id
    [(entry_id, _)] = await redis_client.xrange(client.keys.stream("high"))
    queued_s = int(entry_id.split("-")[0]) / 1000

    async def gap_passed() -> bool:
        seconds, micros = await redis_client.time()
        return seconds + micros / 1e6 >= queued_s + GAP_S

    await async_eventually(gap_passed, 5, f"{GAP_S} s on Redis' clock since the task was queued")
    async with running_agent(settings) as agent:
        assert (await client.wait(task_id, timeout_s=20)).status == "done"
    [started_s] = await start_events_s(redis_client, client, task_id)
    assert pickup(agent, "high", "count") == 1
    assert abs(pickup(agent, "high", "sum") - (started_s - queued_s)) <= 0.002
    assert started_s - queued_s > GAP_S
    for other in ("critical", "normal", "low"):
        assert pickup(agent, other, "count") == 0


async def test_a_requeued_retry_observes_its_own_wait_not_the_failed_attempts_run(
    redis_client: aioredis.Redis, redis_url: str, mock_llm: MockLLM
) -> None:
    mock_llm.config.latency_s = 0.3  # every attempt runs at least this long before it fails
    settings = agent_settings(redis_url, mock_llm.url, max_attempts=2)
    client = TaskClient(redis_client, settings.namespace, settings.pool)
    async with running_agent(settings) as agent:
        task_id = (await client.submit_payload(task(f"fails {POISON_MARKER}"), "low")).task_id
        assert (await client.wait(task_id, timeout_s=20)).status == "dead"
    submitted_s = float(await redis_client.hget(client.keys.task(task_id), "submitted_at") or 0)
    first, second = await start_events_s(redis_client, client, task_id)
    assert second - first >= 0.3
    assert pickup(agent, "low", "count") == 2
    # Both waits together are shorter than submit -> second start less the first attempt's run.
    assert pickup(agent, "low", "sum") <= (second - submitted_s) - 0.3 + 0.002
