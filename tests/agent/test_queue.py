"""Queue semantics: validation, backpressure, idempotency, priority rule, at-least-once hand-over."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import signal
import uuid
from collections import Counter
from typing import Any

import pytest
import redis.asyncio as aioredis
from e2e.harness import async_eventually
from hypothesis import given
from hypothesis import strategies as st

from tars_agent.client import TaskClient
from tars_agent.priority import PrioritySelector
from tars_agent.queue import (
    RETRY_AFTER_MAX_S,
    RETRY_AFTER_MIN_S,
    ClaimLost,
    Consumer,
    Delivery,
    OutputNotStored,
    QueueFull,
    TaskStore,
    retry_after_s,
)
from tars_agent.tasks import PRIORITIES, InvalidTask, parse_spec
from tars_contract.contract import DEFAULT_QUEUE_MAX_DEPTH, QUEUE_GROUP

from .conftest import RedisServer

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
    name = pool()
    client = TaskClient(redis_client, "ns", name, max_depth=3)
    for priority in ("low", "high", "critical"):
        await client.submit_payload(GOOD, priority)
    with pytest.raises(QueueFull) as info:
        await client.submit_payload(GOOD, "critical")
    assert info.value.depth == 3 and info.value.max_depth == 3 and info.value.retry_after_s > 0
    assert "is full (3 tasks, maximum 3); retry after" in str(info.value)
    # a submitter not told the limit goes by the one stored for the pool
    untold = TaskClient(redis_client, "ns", name)
    await untold.set_max_depth(4)
    await untold.submit_payload(GOOD, "critical")
    assert (await untold.stats())["depth"] == 4 and (await untold.stats())["max_depth"] == 4
    with pytest.raises(QueueFull):
        await untold.submit_payload(GOOD, "critical")


async def test_the_limit_a_submitter_is_given_holds_with_no_agent_and_a_stale_stored_limit(
    redis_client: aioredis.Redis,
) -> None:
    name = pool()
    await TaskClient(redis_client, "ns", name).set_max_depth(500)  # what an old agent left behind
    client = TaskClient(redis_client, "ns", name, max_depth=2)
    for _ in range(2):
        await client.submit_payload(GOOD)
    with pytest.raises(QueueFull) as info:
        await client.submit_payload(GOOD)
    assert (info.value.depth, info.value.max_depth) == (2, 2)
    assert (await client.stats())["max_depth"] == 2
    # nobody told and nothing stored: the contract's default
    fresh = TaskClient(redis_client, "ns", pool())
    assert (await fresh.stats())["max_depth"] == DEFAULT_QUEUE_MAX_DEPTH


def test_retry_after_is_the_time_the_backlog_needs_at_the_recent_pace() -> None:
    assert retry_after_s(1, 2.0, 0.5) == 2.0
    assert retry_after_s(5, 2.0, 0.5) == 10.0  # five tasks over the limit wait five gaps
    assert retry_after_s(1, 0.1, 30.0) == 30.0  # a queue that stopped draining is as slow as its silence
    assert retry_after_s(1, None, 3.0) == 3.0  # one finished task so far: the time since it
    assert retry_after_s(1, None, None) == RETRY_AFTER_MAX_S  # nothing ever finished
    assert retry_after_s(1, 0.001, 0.001) == RETRY_AFTER_MIN_S
    assert retry_after_s(1000, 2.0, 1.0) == RETRY_AFTER_MAX_S


async def test_a_full_queue_answers_with_a_retry_after_from_its_pace(redis_client: aioredis.Redis) -> None:
    name = pool()
    client = TaskClient(redis_client, "ns", name, max_depth=2)
    agent = Consumer(redis_client, "ns", name, "agent")
    for _ in range(2):
        await client.submit_payload(GOOD)
    with pytest.raises(QueueFull) as info:
        await client.submit_payload(GOOD)
    assert info.value.retry_after_s == RETRY_AFTER_MAX_S  # no agent has ever finished a task here
    for _ in range(2):  # two tasks finish within milliseconds of each other
        _status, attempt = await agent.begin(await take(agent))
        assert attempt is not None
        await agent.complete(attempt, 1, 1)
    for _ in range(2):
        await client.submit_payload(GOOD)
    with pytest.raises(QueueFull) as info:
        await client.submit_payload(GOOD)
    assert info.value.retry_after_s < RETRY_AFTER_MAX_S


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
    taken = [d for _ in range(3) for d in await dead.take(block_ms=10)]
    assert [d.priority for d in taken] == ["critical", "high", "critical"]
    alive = Consumer(redis_client, "ns", name, "alive-agent", claim_idle_ms=100)
    assert await alive.reclaim(10) == []  # not idle long enough yet
    reclaimed: list[Delivery] = []

    async def reclaim_idle() -> bool:
        reclaimed.extend(await alive.reclaim(10))
        return len(reclaimed) >= 3

    await async_eventually(reclaim_idle, 5, "the dead consumer's entries to be reclaimed")
    assert sorted(d.task_id for d in reclaimed) == sorted(d.task_id for d in taken)
    order = []
    while taken_now := await alive.take(block_ms=10):
        order += [d.priority for d in taken_now]
    assert Counter(order) == {"critical": 2, "high": 3, "normal": 4, "low": 4}
    assert order.index("low") < len(order) - 4  # low is served before the rest are exhausted


async def backlog_of_critical_and_low(redis: aioredis.Redis, consumer: str) -> Consumer:
    """A new pool with 20 critical and 20 low tasks waiting, and a consumer of it with its groups."""
    name = pool()
    client = TaskClient(redis, "ns", name)
    for priority in ("critical", "low"):
        for _ in range(20):
            await client.submit_payload(GOOD, priority)
    taker = Consumer(redis, "ns", name, consumer)
    await taker.ensure_groups()  # as the agent does at its start
    return taker


async def test_an_agent_with_free_slots_takes_a_backlog_by_the_priority_rule_in_one_look(
    redis_client: aioredis.Redis,
) -> None:
    """In a burst, an agent with 25 free slots took its tasks one look and one XREADGROUP at a
    time: two round trips per task. It takes what its slots hold at once now, in the shares
    one-at-a-time taking would have given (8 critical : 1 low), and no more than waits."""
    batch = await backlog_of_critical_and_low(redis_client, "batch-agent")
    name = batch.keys.pool
    one_by_one = Consumer(redis_client, "ns", f"{name}-x", "single-agent")  # the same rule, alone
    expected = [one_by_one._selector.choose({"critical": 20 - i, "low": 20}) for i in range(9)]
    taken = await batch.take(block_ms=10, count=9)
    assert Counter(d.priority for d in taken) == Counter(expected) == {"critical": 8, "low": 1}
    assert len({d.task_id for d in taken}) == 9
    rest = await batch.take(block_ms=10, count=100)
    assert Counter(d.priority for d in rest) == {"critical": 12, "low": 19}
    assert await batch.take(block_ms=10, count=5) == []  # nothing left: the wait ends empty


async def test_a_take_whose_read_fails_for_one_priority_keeps_what_it_read_of_the_others(
    redis_client: aioredis.Redis,
) -> None:
    """The reads of a batched take go in one pipeline: one priority's group gone between the look
    and the read (Redis restarted empty, a stream expired) must not drop the entries the other
    reads delivered, pending under this agent, for a reclaim 30 s later."""
    agent = await backlog_of_critical_and_low(redis_client, "agent")
    look = agent._waiting

    async def look_then_lose_low(**kwargs: Any) -> Any:
        counts = await look(**kwargs)
        await redis_client.xgroup_destroy(agent.keys.stream("low"), QUEUE_GROUP)
        return counts

    agent._waiting = look_then_lose_low  # type: ignore[method-assign]
    taken = await agent.take(block_ms=10, count=9)
    assert [d.priority for d in taken] == ["critical"] * 8


async def test_a_new_task_wakes_one_idle_agent_not_all_of_them(redis_server: RedisServer) -> None:
    """Idle agents wait for work together; a task that arrives must go to one of them while the
    others go on waiting. Waking all to race for it cost every idle agent (and Redis) a round of
    reads per task: at 45 tasks/s and 12 agents that was more CPU than the tasks themselves."""
    name = pool()
    clients = [aioredis.Redis.from_url(redis_server.url, decode_responses=True) for _ in range(5)]
    submitter, *agents = clients
    try:
        consumers = [Consumer(r, "ns", name, f"agent-{i}") for i, r in enumerate(agents)]
        for consumer in consumers:
            await consumer.ensure_groups()
        baseline = int((await submitter.info("clients"))["blocked_clients"])
        takes = [asyncio.create_task(c.take(block_ms=20_000)) for c in consumers]

        async def all_waiting() -> bool:
            return int((await submitter.info("clients"))["blocked_clients"]) == baseline + len(takes)

        await async_eventually(all_waiting, 5, "the idle agents to wait for work")
        task_id = (await TaskClient(submitter, "ns", name).submit_payload(GOOD)).task_id
        done, _ = await asyncio.wait(takes, return_when=asyncio.FIRST_COMPLETED)
        assert [[d.task_id for d in t.result()] for t in done] == [[task_id]]
        # the others were never woken: still blocked in Redis once the winner holds the task
        assert int((await submitter.info("clients"))["blocked_clients"]) == baseline + len(takes) - 1
        assert all(not t.done() for t in takes if t not in done)
        for t in takes:
            t.cancel()
        await asyncio.gather(*takes, return_exceptions=True)
    finally:
        for r in clients:
            await r.aclose()


async def test_an_agent_waiting_for_work_when_its_queue_is_deleted_recreates_it(
    redis_server: RedisServer,
) -> None:
    """A pool's idle streams expire (or an admin deletes them) while agents wait in their group:
    Redis ends the wait with an error; the agent recreates the groups and goes on waiting."""
    name = pool()
    agent_redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    admin = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        consumer = Consumer(agent_redis, "ns", name, "agent")
        await consumer.ensure_groups()
        baseline = int((await admin.info("clients"))["blocked_clients"])
        waiting = asyncio.create_task(consumer.take(block_ms=20_000))

        async def blocked() -> bool:
            return int((await admin.info("clients"))["blocked_clients"]) == baseline + 1

        await async_eventually(blocked, 5, "the agent to wait for work")
        await admin.delete(*consumer.keys.streams)
        assert await asyncio.wait_for(waiting, 10) == []
        task_id = (await TaskClient(admin, "ns", name).submit_payload(GOOD)).task_id
        assert [d.task_id for d in await consumer.take(block_ms=1000)] == [task_id]
    finally:
        await agent_redis.aclose()
        await admin.aclose()


async def take(consumer: Consumer) -> Delivery:
    """The next task for `consumer` (the first take of a new pool only creates its groups)."""
    taken: list[Delivery] = []

    async def one() -> bool:
        taken.extend(await consumer.take(block_ms=10))
        return bool(taken)

    await async_eventually(one, 5, f"{consumer.name} to take a task")
    return taken[0]


async def reclaim_one(consumer: Consumer) -> Delivery:
    reclaimed: list[Delivery] = []

    async def one() -> bool:
        reclaimed.extend(await consumer.reclaim(1))
        return bool(reclaimed)

    await async_eventually(one, 5, f"{consumer.name} to reclaim an idle entry")
    return reclaimed[0]


async def test_an_attempt_whose_entry_was_reclaimed_across_a_redis_restart_is_fenced_off(
    persistent_redis: RedisServer,
) -> None:
    redis = aioredis.Redis.from_url(persistent_redis.url, decode_responses=True)
    try:
        name = pool()
        client = TaskClient(redis, "ns", name)
        task_id = (await client.submit_payload(GOOD)).task_id
        a = Consumer(redis, "ns", name, "agent-a", claim_idle_ms=200)
        b = Consumer(redis, "ns", name, "agent-b", claim_idle_ms=200)
        d = await take(a)
        _status, first = await a.begin(d)
        assert first is not None
        written = await a.append_output(first, 0, "A1 ")
        # agent-a stalls; Redis restarts from its AOF meanwhile and agent-b takes the entry over
        persistent_redis.stop(signal.SIGKILL)
        persistent_redis.start()
        await redis.connection_pool.disconnect()
        _status, second = await b.begin(await reclaim_one(b))
        assert second is not None and second.number == 2
        stored = await b.append_output(second, 0, "B1 ")
        with pytest.raises(ClaimLost):
            await a.append_output(first, written, "A2 ")
        stored = await b.append_output(second, stored, "B2 ")
        with pytest.raises(ClaimLost):
            await a.complete(first, 1, 1)
        assert await a.touch([d]) == [d.entry_id]  # how a stalled agent learns to stop
        await b.complete(second, 1, 1)
        result = await client.result(task_id)
        assert result is not None
        assert (result.status, result.output, result.worker, result.attempts) == (
            "done",
            "B1 B2 ",
            "agent-b",
            2,
        )
    finally:
        await redis.aclose()


async def test_retried_writes_count_once_and_missing_output_fails_the_attempt(
    redis_client: aioredis.Redis,
) -> None:
    name = pool()
    client = TaskClient(redis_client, "ns", name)
    task_id = (await client.submit_payload(GOOD)).task_id
    agent = Consumer(redis_client, "ns", name, "agent")
    delivery = await take(agent)
    _status, attempt = await agent.begin(delivery)
    assert await agent.begin(delivery) == ("run", attempt)  # its reply was lost: sent again
    assert attempt is not None and (attempt.number, attempt.fence) == (1, 1)
    assert await agent.append_output(attempt, 0, "héllo ") == 7
    assert await agent.append_output(attempt, 0, "héllo ") == 7  # its reply was lost: sent again
    with pytest.raises(OutputNotStored, match="expected 3 bytes"):
        await agent.append_output(attempt, 3, "world")
    with pytest.raises(OutputNotStored, match="expected 3 bytes of output in Redis at its completion"):
        await agent.complete(attempt, 1, 1, offset=3, tail="world")
    await agent.complete(attempt, 1, 1, offset=7, tail="wörld")
    # a retried completion of the same attempt is no error, and appends its tail once
    await agent.complete(attempt, 1, 1, offset=7, tail="wörld")
    result = await client.result(task_id)
    assert result is not None and (result.status, result.output) == ("done", "héllo wörld")


async def test_dead_lettered_task_attempts_agree_with_its_error(redis_client: aioredis.Redis) -> None:
    name = pool()
    client = TaskClient(redis_client, "ns", name)
    task_id = (await client.submit_payload(GOOD)).task_id
    first = Consumer(redis_client, "ns", name, "a", claim_idle_ms=50, max_attempts=2)
    await first.begin(await take(first))
    for who in ("b", "c"):  # each agent dies during its attempt; the last reclaimer gives up
        agent = Consumer(redis_client, "ns", name, who, claim_idle_ms=50, max_attempts=2)
        await agent.begin(await reclaim_one(agent))
    result = await client.result(task_id)
    assert result is not None and result.status == "dead"
    assert result.error is not None and result.error.startswith("gave up after 2 attempts")
    assert result.attempts == 2
    [letter] = await client.dead_letters()
    assert letter["attempts"] == "2"


async def test_a_heartbeat_that_meets_an_entry_just_completed_does_not_call_it_taken_over(
    redis_client: aioredis.Redis,
) -> None:
    """The heartbeat lists the agent's held entries, then asks Redis; a task that completes in
    between is no longer pending, but nobody took it over: stopping its attempt then was a false
    alarm (64 in ~5,500 tasks of a lone 100-slot agent), which cut the task's last steps."""
    name = pool()
    await TaskClient(redis_client, "ns", name).submit_payload(GOOD)
    agent = Consumer(redis_client, "ns", name, "agent")
    d = await take(agent)
    _status, attempt = await agent.begin(d)
    assert attempt is not None
    await agent.complete(attempt, 1, 1)  # between the heartbeat's list and its script
    assert await agent.touch([d]) == []


async def test_reclaim_follows_its_cursor_past_a_live_backlog(redis_client: aioredis.Redis) -> None:
    name = pool()
    client = TaskClient(redis_client, "ns", name)
    for _ in range(27):
        await client.submit_payload(GOOD)
    live = Consumer(redis_client, "ns", name, "live", claim_idle_ms=200)
    dead = Consumer(redis_client, "ns", name, "dead", claim_idle_ms=200)
    held = [await take(live) for _ in range(25)]  # older entries, pending under an agent that lives
    lost = [await take(dead) for _ in range(2)]

    async def all_idle() -> bool:
        pending = await redis_client.xpending_range(client.keys.stream("normal"), "agents", "-", "+", 100)
        return all(p["time_since_delivered"] > 200 for p in pending)

    await async_eventually(all_idle, 5, "every pending entry to look idle")
    assert await live.touch(held) == []  # the live agent's heartbeat
    rescuer = Consumer(redis_client, "ns", name, "rescuer", claim_idle_ms=200)
    reclaimed = await rescuer.reclaim(2)
    assert sorted(d.entry_id for d in reclaimed) == sorted(d.entry_id for d in lost)


async def test_an_idle_pool_leaves_no_key_behind_but_waiting_work_never_expires(
    redis_client: aioredis.Redis,
) -> None:
    name = pool()
    ttl = {"pool_idle_ttl_s": 1}
    store = TaskStore(redis_client, "ns", name, idempotency_ttl_s=1, **ttl)
    agent = Consumer(redis_client, "ns", name, "agent", result_ttl_s=1, **ttl)
    finished = await store.submit(parse_spec(GOOD))
    waiting = await store.submit(parse_spec(GOOD))
    _status, attempt = await agent.begin(await take(agent))
    assert attempt is not None and attempt.delivery.task_id == finished.task_id
    await agent.append_output(attempt, 0, "answer")
    await agent.complete(attempt, 1, 1)
    queue = store.keys.stream("normal")

    async def pool_keys() -> set[str]:
        return {key async for key in redis_client.scan_iter(match=f"tars:{{ns/{name}}}*")}

    for key in await pool_keys():  # every key has a lifetime, but the stream holding work
        assert (await redis_client.ttl(key) == -1) == (key == queue), key

    async def only_the_queue_left() -> bool:
        return await pool_keys() == {queue}

    await async_eventually(only_the_queue_left, 10, "the idle pool's other keys to expire")
    # the waiting task outlived its status hash; an agent still runs it
    _status, attempt = await agent.begin(await take(agent))
    assert attempt is not None and attempt.delivery.task_id == waiting.task_id
    await agent.append_output(attempt, 0, "late answer")
    await agent.complete(attempt, 1, 1)
    result = await store.result(waiting.task_id)
    assert result is not None and (result.status, result.output) == ("done", "late answer")

    async def nothing_left() -> bool:
        return await pool_keys() == set()

    await async_eventually(nothing_left, 10, "every key of the idle pool to expire")


async def test_counting_an_idle_pools_queue_leaves_no_garbage_for_the_collector(
    redis_client: aioredis.Redis,
) -> None:
    """An idle pool's streams expire; the agents count its queue for tars_queue_depth every few
    seconds. XINFO GROUPS of a missing stream answered with errors that redis-py keeps in
    reference cycles (the operator's collector paused 300-400 ms for them at 100 pools)."""
    store = TaskStore(redis_client, "ns", pool())
    assert await store.waiting() == dict.fromkeys(PRIORITIES, 0)  # no stream at all
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            await store.waiting()
        in_cycles = gc.collect()
    finally:
        gc.enable()
    assert in_cycles < 20, f"{in_cycles} objects in reference cycles after 20 counts"
