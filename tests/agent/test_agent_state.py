"""The agent publishes its GET /status answer to Redis (contract.agent_state_key) for the operator."""

from __future__ import annotations

import datetime as dt
import gc
import itertools
import json
import time
import uuid
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from e2e.harness import async_eventually

from tars_agent.client import TaskClient
from tars_agent.mockllm import MockLLM
from tars_agent.queue import Consumer, TaskStore
from tars_contract import contract
from tars_operator.sources import AgentState, AgentStateReader, PoolReading

from .conftest import AUTH, agent_settings, running_agent

TASK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}


async def test_the_agent_publishes_its_work_and_its_drain_at_once_and_with_a_ttl(
    redis_client: aioredis.Redis, redis_url: str, mock_llm: MockLLM
) -> None:
    mock_llm.config.response_tokens = 200
    mock_llm.config.chunk_delay_s = 0.05  # a task of ~10 s: in flight while we look
    settings = agent_settings(redis_url, mock_llm.url)
    key = contract.agent_state_key(settings.namespace, settings.pool, settings.pod_name)

    async def published() -> object:
        raw = await redis_client.get(key)
        return json.loads(raw) if raw else None

    slots = settings.concurrency
    async with running_agent(settings) as agent:
        idle = {"inflight": 0, "draining": False, "slots": slots}
        assert await async_eventually(published, 5, "the idle state") == idle
        ttl = await redis_client.ttl(key)
        assert 0 < ttl <= contract.AGENT_STATE_TTL_SECONDS  # a dead agent's state goes by itself
        client = TaskClient(redis_client, settings.namespace, settings.pool)
        await client.submit_payload({"messages": [{"role": "user", "content": "long"}], "max_tokens": 200})
        await async_eventually(lambda: len(agent.inflight) == 1, 20, "the agent to take the task")
        # From the moment it has the task, well within the refresh period: published on the
        # change, not on the next refresh.
        within = contract.AGENT_STATE_REFRESH_SECONDS / 2

        async def busy() -> bool:
            return await published() == {"inflight": 1, "draining": False, "slots": slots}

        await async_eventually(busy, within, "the task in flight published")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}") as http:
            assert (await http.post(contract.PATH_DRAIN, headers=AUTH)).status_code == 202

        async def drained() -> bool:
            return await published() == {"inflight": 1, "draining": True, "slots": slots}

        await async_eventually(drained, within, "the drain published")


async def test_the_operator_reads_what_the_agents_published_in_one_round_trip(
    redis_client: aioredis.Redis, redis_url: str, mock_llm: MockLLM
) -> None:
    settings = agent_settings(redis_url, mock_llm.url)
    reader = AgentStateReader(aioredis.Redis.from_url(redis_url))
    try:
        async with running_agent(settings):

            async def read() -> dict[str, AgentState] | None:
                pods = [settings.pod_name, "never-started"]
                reading = await reader.read(settings.namespace, settings.pool, pods, queue_depth=True)
                assert reading.queue_depth is not None and reading.queue_depth.value == 0
                return reading.states

            states = await async_eventually(read, 5, "the agent's published state")
            # The pod that never published is absent: the operator asks it over HTTP instead.
            assert states == {
                settings.pod_name: AgentState(inflight=0, draining=False, slots=settings.concurrency)
            }
    finally:
        await reader.close()


async def test_the_operator_counts_the_waiting_tasks_in_redis_as_the_agents_export_them(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    """The operator's queue depth (read each second, for reaction within a second of a crossing)
    is the number the agents put in tars_queue_depth: submitted and not yet taken, every priority,
    a task in an agent's hands not counted; nothing at all for a pool that never had a task."""
    namespace, pool = "ns", f"depth-{uuid.uuid4().hex[:8]}"
    reader = AgentStateReader(aioredis.Redis.from_url(redis_url))
    try:
        empty = (await reader.read(namespace, pool, [], queue_depth=True)).queue_depth
        assert empty is not None and empty.value == 0  # no stream yet: nothing waits
        client = TaskClient(redis_client, namespace, pool)
        for priority, n in (("critical", 1), ("high", 2), ("normal", 3), ("low", 4)):
            for _ in range(n):
                await client.submit_payload({"messages": [{"role": "user", "content": "hi"}]}, priority)
        agent = Consumer(redis_client, namespace, pool, "agent")
        taken = await async_eventually(lambda: agent.take(block_ms=10), 5, "a task to take")  # in flight
        store = TaskStore(redis_client, namespace, pool)
        depth = (await reader.read(namespace, pool, [], queue_depth=True)).queue_depth
        assert depth is not None
        assert depth.value == sum((await store.waiting()).values()) == 9, taken
        assert abs((depth.at - dt.datetime.now(dt.UTC)).total_seconds()) < 5  # sampled now
    finally:
        await reader.close()


async def test_reading_an_idle_pool_every_second_leaves_no_garbage_for_the_collector(redis_url: str) -> None:
    """A pool whose streams expired (no task for a while) answered XINFO GROUPS with errors: each
    read left ~80 objects in reference cycles, at 100 pools ~8,000 a second, and the operator's
    collector stopped its event loop for 300-400 ms every ~8 s (bench/README.md operator_scale)."""
    reader = AgentStateReader(aioredis.Redis.from_url(redis_url))
    namespace, pool = "ns", f"idle-{uuid.uuid4().hex[:8]}"
    try:
        first = await reader.read(namespace, pool, ["a"], queue_depth=True)
        assert first.queue_depth is not None and first.queue_depth.value == 0
        gc.collect()
        gc.disable()
        try:
            for _ in range(20):
                await reader.read(namespace, pool, ["a"], queue_depth=True)
            in_cycles = gc.collect()
        finally:
            gc.enable()
        assert in_cycles < 20, f"{in_cycles} objects in reference cycles after 20 reads"
    finally:
        await reader.close()


async def test_the_operators_reading_is_unknown_not_empty_when_redis_does_not_answer() -> None:
    """Neither "nobody published" nor "nothing waits": the pool then holds, it never scales in."""
    reader = AgentStateReader(aioredis.Redis(port=1, socket_connect_timeout=0.5))  # nothing listens
    try:
        assert await reader.read("ns", "p", ["a", "b"], queue_depth=True) == PoolReading(None, None)
        assert await reader.read("ns", "p", ["a"], queue_depth=False) == PoolReading(None, None)
    finally:
        await reader.close()


async def test_a_burst_of_changes_is_published_in_few_writes(
    redis_client: aioredis.Redis, redis_url: str, mock_llm: MockLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every task start and end changes the state: published one write each, a 300-task burst
    cost 600 writes across the pool (~4 % of an agent's CPU) for an operator that reads once a
    second. Changes within AGENT_STATE_MIN_GAP_SECONDS of the last write go out together."""
    settings = agent_settings(redis_url, mock_llm.url, concurrency=25, requests_per_minute=60_000)
    key = contract.agent_state_key(settings.namespace, settings.pool, settings.pod_name)
    client = TaskClient(redis_client, settings.namespace, settings.pool)
    async with running_agent(settings) as agent:
        await async_eventually(lambda: redis_client.get(key), 5, "the idle state published")
        real = agent.redis.set
        writes: list[float] = []

        async def counted(name: str, *args: Any, **kwargs: Any) -> Any:
            if name == key:
                writes.append(time.monotonic())
            return await real(name, *args, **kwargs)

        monkeypatch.setattr(agent.redis, "set", counted)
        began = time.monotonic()
        ids = [(await client.submit_payload(TASK)).task_id for _ in range(50)]
        for task_id in ids:
            assert (await client.wait(task_id, timeout_s=20)).status == "done"
        took = time.monotonic() - began

        async def idle_published() -> bool:
            raw = await redis_client.get(key)
            return raw is not None and json.loads(raw)["inflight"] == 0

        await async_eventually(idle_published, 5, "the idle state published again")
    # 100 changes (50 starts, 50 ends); the last write after them may come a gap later
    allowed = (took + contract.AGENT_STATE_MIN_GAP_SECONDS) / contract.AGENT_STATE_MIN_GAP_SECONDS + 1
    assert len(writes) <= allowed, f"{len(writes)} writes in {took:.2f} s for 100 changes"
    gaps = [b - a for a, b in itertools.pairwise(writes)]
    assert all(g >= contract.AGENT_STATE_MIN_GAP_SECONDS * 0.9 for g in gaps), gaps
