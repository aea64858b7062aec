"""Queue semantics: validation, backpressure, idempotency, priority rule, at-least-once hand-over."""

from __future__ import annotations

import itertools
import json
import uuid
from collections import Counter

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from tars_agent.client import TaskClient
from tars_agent.priority import PRIORITIES, PrioritySelector
from tars_agent.queue import Consumer, Delivery, QueueFull
from tars_agent.tasks import InvalidTask, parse_spec

from .conftest import async_wait_until

GOOD = {"messages": [{"role": "user", "content": "hi"}]}


def pool() -> str:
    return f"q{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize(
    ("payload", "names"),
    [
        ({}, ["messages: Field required"]),
        ({"messages": []}, ["messages: List should have at least 1 item"]),
        ({"messages": [{"role": "boss", "content": "x"}]}, ["messages.0.role"]),
        ({"messages": [{"role": "user"}]}, ["messages.0.content: Field required"]),
        (GOOD | {"max_tokens": 0}, ["max_tokens: Input should be greater than or equal to 1"]),
        (GOOD | {"temperature": 9}, ["temperature"]),
        (GOOD | {"colour": "red"}, ["colour: Extra inputs are not permitted"]),
        ("not json", ["payload is not JSON"]),
        ("[1, 2]", ["payload must be a JSON object, got list"]),
        (json.dumps({"messages": [{"role": "user", "content": "x" * 300_000}]}), ["bytes, more than the"]),
    ],
)
def test_bad_payloads_are_refused_naming_the_problem(payload: object, names: list[str]) -> None:
    with pytest.raises(InvalidTask) as info:
        parse_spec(payload)  # type: ignore[arg-type]
    for name in names:
        assert name in str(info.value)


async def test_bad_priority_and_payload_are_refused_before_queueing(redis_client: aioredis.Redis) -> None:
    client = TaskClient(redis_client, "ns", pool())
    with pytest.raises(InvalidTask, match="priority 'urgent' is not one of critical, high, normal, low"):
        await client.submit_payload(GOOD, "urgent")
    with pytest.raises(InvalidTask, match="max_tokens"):
        await client.submit_payload(GOOD | {"max_tokens": -1})
    assert (await client.stats())["depth"] == 0


async def test_backpressure_refuses_beyond_max_depth_with_retry_after(redis_client: aioredis.Redis) -> None:
    client = TaskClient(redis_client, "ns", pool(), default_max_depth=3)
    for priority in ("low", "high", "critical"):
        await client.submit_payload(GOOD, priority)
    with pytest.raises(QueueFull) as info:
        await client.submit_payload(GOOD, "critical")
    assert info.value.depth == 3 and info.value.max_depth == 3 and info.value.retry_after_s > 0
    assert "is full (3 tasks, maximum 3); retry after" in str(info.value)
    # the limit the agents wrote to Redis wins over the client's default
    await client.set_max_depth(4)
    await client.submit_payload(GOOD, "critical")
    assert (await client.stats())["depth"] == 4


async def test_idempotency_key_makes_a_retried_submit_a_no_op(redis_client: aioredis.Redis) -> None:
    client = TaskClient(redis_client, "ns", pool())
    first = await client.submit_payload(GOOD, "normal", idempotency_key="order-42")
    again = await client.submit_payload(GOOD, "normal", idempotency_key="order-42")
    other = await client.submit_payload(GOOD, "normal", idempotency_key="order-43")
    assert not first.duplicate and again.duplicate and again.task_id == first.task_id
    assert other.task_id != first.task_id
    assert (await client.stats())["depth"] == 2


def test_selector_serves_priorities_8_4_2_1_and_never_starves_low() -> None:
    selector = PrioritySelector()
    everywhere = dict.fromkeys(PRIORITIES, 100)
    picks = [selector.choose(everywhere) for _ in range(150)]
    assert picks[0] == "critical"
    assert Counter(picks) == {"critical": 80, "high": 40, "normal": 20, "low": 10}
    gaps = [i for i, p in enumerate(picks) if p == "low"]
    assert gaps[0] < 15 and all(b - a == 15 for a, b in itertools.pairwise(gaps))


@given(st.lists(st.dictionaries(st.sampled_from(PRIORITIES), st.integers(0, 3)), min_size=1, max_size=60))
def test_selector_only_picks_waiting_queues_and_always_picks_one(rounds: list[dict[str, int]]) -> None:
    selector = PrioritySelector()
    for waiting in rounds:
        chosen = selector.choose(waiting)
        if any(waiting.values()):
            assert chosen is not None and waiting[chosen] > 0
        else:
            assert chosen is None


async def test_consumer_takes_by_priority_rule_and_reclaims_a_dead_consumers_work(
    redis_client: aioredis.Redis,
) -> None:
    name = pool()
    client = TaskClient(redis_client, "ns", name)
    for priority in PRIORITIES:
        for _ in range(4):
            await client.submit_payload(GOOD, priority)
    dead = Consumer(redis_client, "ns", name, "dead-agent", claim_idle_ms=100)
    taken = [await dead.take(block_ms=10) for _ in range(3)]
    assert [d.priority for d in taken if d] == ["critical", "high", "critical"]
    alive = Consumer(redis_client, "ns", name, "alive-agent", claim_idle_ms=100)
    assert await alive.reclaim(10) == []  # not idle long enough yet
    reclaimed: list[Delivery] = []

    async def reclaim_idle() -> bool:
        reclaimed.extend(await alive.reclaim(10))
        return len(reclaimed) >= 3

    await async_wait_until(reclaim_idle, 5, "the dead consumer's entries to be reclaimed")
    assert sorted(d.task_id for d in reclaimed) == sorted(d.task_id for d in taken if d)
    order = []
    while (d := await alive.take(block_ms=10)) is not None:
        order.append(d.priority)
    assert Counter(order) == {"critical": 2, "high": 3, "normal": 4, "low": 4}
    assert order.index("low") < len(order) - 4  # low is served before the rest are exhausted
