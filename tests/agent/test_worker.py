"""An in-process agent against real Redis and the mock upstream."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import redis.asyncio as aioredis
from e2e.harness import async_eventually
from redis.exceptions import ConnectionError as RedisConnectionError

from tars_agent import worker
from tars_agent.client import TaskClient
from tars_agent.metrics import AgentMetrics
from tars_agent.mockllm import POISON_MARKER, MockLLM
from tars_agent.queue import Attempt, Delivery
from tars_contract import contract
from tars_contract import metric_names as m

from .conftest import AUTH, agent_settings, running_agent


def user(text: str, stream: bool = True, max_tokens: int = 32) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "stream": stream}


async def test_tasks_complete_with_streamed_and_plain_answers(
    redis_client: aioredis.Redis, redis_url: str, mock_llm: MockLLM
) -> None:
    mock_llm.config.response_tokens = 5
    settings = agent_settings(redis_url, mock_llm.url, concurrency=4, requests_per_minute=6000)
    client = TaskClient(redis_client, settings.namespace, settings.pool)
    async with running_agent(settings) as agent:
        ids = [
            (await client.submit_payload(user(f"q{i}", stream=i % 2 == 0), "normal")).task_id
            for i in range(12)
        ]
        results = [await client.wait(task_id, timeout_s=20) for task_id in ids]
        assert [r.status for r in results] == ["done"] * 12
        assert {r.output for r in results} == {"w0 w1 w2 w3 w4"}
        assert all(r.completion_tokens == 5 and r.worker == settings.pod_name for r in results)

        base = f"http://127.0.0.1:{settings.http_port}"
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get(contract.PATH_HEALTHZ)).status_code == 200
            await async_eventually(lambda: agent.redis_ready, 5, "agent ready")
            assert (await http.get(contract.PATH_READYZ)).status_code == 200
            assert (await http.get(contract.PATH_STATUS, headers=AUTH)).json() == {
                "inflight": 0,
                "draining": False,
                "slots": settings.concurrency,
            }
            metrics = (await http.get(contract.PATH_METRICS)).text
            for name in (
                m.AGENT_BUSY,
                m.TASKS_TOTAL,
                m.LLM_REQUESTS_TOTAL,
                m.LIMITER_WAIT_SECONDS,
                m.TASK_DURATION_SECONDS,
                m.CIRCUIT_STATE,
                m.QUEUE_DEPTH,
            ):
                assert name in metrics, name
            assert 'tars_tasks_total{outcome="done"} 12.0' in metrics
            assert 'tars_llm_requests_total{code="200"} 12.0' in metrics


async def test_follow_streams_the_output(
    redis_client: aioredis.Redis, redis_url: str, mock_llm: MockLLM
) -> None:
    mock_llm.config.response_tokens = 30
    mock_llm.config.chunk_delay_s = 0.01
    settings = agent_settings(redis_url, mock_llm.url)
    client = TaskClient(redis_client, settings.namespace, settings.pool)
    async with running_agent(settings):
        task_id = (await client.submit_payload(user("stream me", max_tokens=64))).task_id
        kinds, text = [], []
        async for event in client.follow(task_id, timeout_s=20):
            kinds.append(event.kind)
            text.append(event.text)
        assert kinds[0] == "start" and kinds[-1] == "done"
        assert kinds.count("text") > 1  # it arrived in pieces, not at the end
        assert "".join(text) == " ".join(f"w{i}" for i in range(30))


async def test_poison_task_is_dead_lettered_with_its_error_after_max_attempts(
    redis_client: aioredis.Redis, redis_url: str, mock_llm: MockLLM
) -> None:
    settings = agent_settings(redis_url, mock_llm.url, max_attempts=3)
    client = TaskClient(redis_client, settings.namespace, settings.pool)
    async with running_agent(settings):
        poison = (await client.submit_payload(user(f"please {POISON_MARKER}"))).task_id
        fine = (await client.submit_payload(user("fine"))).task_id
        result = await client.wait(poison, timeout_s=20)
        assert (await client.wait(fine, timeout_s=20)).status == "done"
    assert result.status == "dead"
    assert result.attempts == 3
    assert (
        result.error is not None and "poison input refused" in result.error and "3 attempts" in result.error
    )
    dead = await client.dead_letters()
    assert len(dead) == 1
    assert json.loads(dead[0]["task"])["id"] == poison
    assert "poison input refused" in dead[0]["error"]
    assert len(mock_llm.admitted) == 4  # three tries of the poison task, one of the fine task


async def test_unparsable_queue_entry_is_dead_lettered_at_once(
    redis_client: aioredis.Redis, redis_url: str, mock_llm: MockLLM
) -> None:
    settings = agent_settings(redis_url, mock_llm.url)
    client = TaskClient(redis_client, settings.namespace, settings.pool)
    stream = client.keys.stream("high")
    await redis_client.xgroup_create(stream, "agents", id="0", mkstream=True)
    await redis_client.xadd(stream, {"task": json.dumps({"id": "x", "priority": "urgent"})})
    async with running_agent(settings):
        await async_eventually(lambda: redis_client.xlen(client.keys.dead), 10, "dead letter")
    [letter] = await client.dead_letters()
    assert "invalid queued task" in letter["error"]
    assert "priority" in letter["error"] and "spec" in letter["error"]
    assert await redis_client.xlen(stream) == 0
    assert mock_llm.admitted == []


async def test_a_streamed_task_answered_with_plain_json_gets_that_answer(
    redis_client: aioredis.Redis, redis_url: str, mock_llm: MockLLM
) -> None:
    mock_llm.config.response_tokens = 5
    mock_llm.config.ignore_stream = True  # the upstream ignores "stream": true
    settings = agent_settings(redis_url, mock_llm.url)
    client = TaskClient(redis_client, settings.namespace, settings.pool)
    async with running_agent(settings):
        task_id = (await client.submit_payload(user("q", stream=True))).task_id
        result = await client.wait(task_id, timeout_s=20)
    assert [e["stream"] for e in mock_llm.admitted] == [True]
    assert (result.status, result.output, result.completion_tokens) == ("done", "w0 w1 w2 w3 w4", 5)


async def test_a_failed_output_append_fails_the_attempt_instead_of_leaving_a_gap(
    redis_client: aioredis.Redis, redis_url: str, mock_llm: MockLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "STORE_RETRY_S", 0.0)  # give up on Redis at the first error
    mock_llm.config.response_tokens = 6
    mock_llm.config.chunk_delay_s = 0.15  # one append per word
    settings = agent_settings(redis_url, mock_llm.url)
    client = TaskClient(redis_client, settings.namespace, settings.pool)
    async with running_agent(settings) as agent:
        real = agent.consumer.append_output
        calls = 0

        async def second_append_fails(a: Attempt, offset: int, text: str) -> int:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise RedisConnectionError("injected: connection lost during the append")
            return await real(a, offset, text)

        monkeypatch.setattr(agent.consumer, "append_output", second_append_fails)
        task_id = (await client.submit_payload(user("q", stream=True))).task_id
        result = await client.wait(task_id, timeout_s=20)
    assert (result.status, result.output) == ("done", "w0 w1 w2 w3 w4 w5")
    assert result.attempts == 2 and len(mock_llm.admitted) == 2


async def test_an_answer_that_fits_one_write_is_stored_with_its_completion(
    redis_client: aioredis.Redis, redis_url: str, mock_llm: MockLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output left in the writer at the end goes to Redis in the completion's own script call,
    not in an append of its own: a round trip and a script call less per task."""
    mock_llm.config.response_tokens = 4  # streamed at once: all of it is still buffered at the end
    settings = agent_settings(redis_url, mock_llm.url)
    client = TaskClient(redis_client, settings.namespace, settings.pool)
    async with running_agent(settings) as agent:
        real = agent.consumer.append_output
        appends = 0

        async def counted(a: Attempt, offset: int, text: str) -> int:
            nonlocal appends
            appends += 1
            return await real(a, offset, text)

        monkeypatch.setattr(agent.consumer, "append_output", counted)
        task_id = (await client.submit_payload(user("q", stream=True))).task_id
        result = await client.wait(task_id, timeout_s=20)
        events = [fields["event"] for _, fields in await redis_client.xrange(client.keys.chunks(task_id))]
    assert (result.status, result.output, appends) == ("done", "w0 w1 w2 w3", 0)
    assert events == ["start", "text", "done"]  # a follower still sees the text before the end


async def test_the_agent_stops_when_a_redis_call_loses_the_cancel_of_its_shutdown(
    redis_client: aioredis.Redis, redis_url: str, mock_llm: MockLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py writes through asyncio.wait_for, which on Python 3.11 (the image's) returns the
    call's result and drops the cancel when the cancel meets the write's end (CPython gh-86296).
    The heartbeat that lost it must still end, or SIGTERM waits for the kill."""
    settings = agent_settings(redis_url, mock_llm.url, drain_grace_seconds=1.0)
    agent = worker.Agent(settings, metrics=AgentMetrics(process_collector=False))
    touching = asyncio.Event()
    cancels_lost = 0

    async def touch_that_loses_a_cancel(held: list[Delivery]) -> list[str]:
        nonlocal cancels_lost
        touching.set()
        try:
            await asyncio.Event().wait()  # a Redis call still under way when the agent stops
        except asyncio.CancelledError:
            cancels_lost += 1
        return []

    monkeypatch.setattr(agent.consumer, "touch", touch_that_loses_a_cancel)
    run = asyncio.create_task(agent.run())
    await asyncio.wait_for(touching.wait(), 10)
    agent.request_stop()
    done, _ = await asyncio.wait({run}, timeout=10)
    if not done:
        run.cancel()  # the heartbeat hangs in its next touch; let pytest clean up
    assert (bool(done), cancels_lost) == (True, 1)
    assert run.result() is None
