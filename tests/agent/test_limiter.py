"""The shared limiter against a real Redis: many processes, pauses, upstream headers, degraded mode."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from e2e.harness import async_eventually
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import TimeoutError as RedisTimeoutError

from tars_agent import gcra
from tars_agent.gcra import LimitParams
from tars_agent.limiter import (
    _AGENT_TTL_US,
    AGENT_TTL_S,
    HEARTBEAT_INTERVAL_S,
    Budget,
    LimiterTimeout,
    RequestTooLarge,
    SharedLimiter,
    _op_args,
    _Request,
    _resp,
    agents_key,
    pause_channel,
    state_key,
)
from tars_agent.metrics import AgentMetrics
from tars_agent.settings import AgentSettings
from tars_contract import metric_names

from .conftest import RedisServer
from .limiter_budget import REQUESTS, TOKENS, WINDOW_US
from .test_gcra import max_in_closed_window

HAMMER = Path(__file__).with_name("limiter_hammer.py")


def fast_redis(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url, socket_timeout=0.25, socket_connect_timeout=0.25, retry=Retry(NoBackoff(), 0)
    )


async def stored(client: aioredis.Redis, budget: str) -> gcra.State:
    return gcra.decode_state(await client.get(state_key(budget))) or gcra.State()


async def stored_tat(client: aioredis.Redis, budget: str, limit: str) -> int:
    """The bucket's tat in the budget's state (0: none stored)."""
    bucket = dict((await stored(client, budget)).buckets).get(limit)
    return 0 if bucket is None else bucket.tat


def conforms_to_strict_bucket(slots_us: list[int], capacity: float, per_s: float) -> bool:
    """Would a strict token bucket (full at first, `capacity` requests, refilling at `per_s`)
    admit a request at every one of these times?"""
    level, last = capacity, slots_us[0]
    for t in slots_us:
        level = min(capacity, level + (t - last) / 1_000_000 * per_s)
        last = t
        if level < 1 - 1e-9:
            return False
        level -= 1
    return True


@pytest.mark.parametrize("rpm", [60, 600, 6_000, 90_000])
@pytest.mark.parametrize("priority", ["critical", "normal"])
def test_the_default_burst_fits_an_upstream_that_enforces_its_minute_per_second(
    rpm: int, priority: str
) -> None:
    """OpenAI: rate limits "can be quantized, meaning they are enforced over shorter periods of
    time (e.g. 60,000 requests/minute may be enforced as 1,000 requests/second)". Saturating demand
    on a budget unused for long (a full bucket): with the agent's default burst, every slot passes
    a strict bucket of one second's worth of the limit, so a quantizing upstream refuses nothing."""
    budget = Budget.from_rates(
        "quantized", requests_per_minute=rpm, burst_fraction=AgentSettings().burst_fraction
    )
    limits = gcra.Limits(budget.limits, (None,), AgentSettings().reserve_fraction)
    now, tats, slots = 100_000_000, (0,), []
    for _ in range(3 * rpm // 60 + 20):  # a few seconds of demand at once
        verdict = gcra.reserve(tats, now, (1,), limits, priority == "critical", 10**12)
        assert verdict.admitted
        tats = verdict.tats
        slots.append(verdict.slot_us)
    assert conforms_to_strict_bucket(slots, rpm / 60, rpm / 60), (budget.limits, slots[:40])


def test_many_processes_never_exceed_the_budget_in_any_window(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Four OS processes x four concurrent callers hammer one budget for 3 s; the admissions,
    timed on the Redis clock, never exceed either limit in any closed 1 s window, and the
    binding limit is nearly fully used."""
    budget = f"hammer-{uuid.uuid4().hex}"
    outs = [tmp_path / f"out{i}.jsonl" for i in range(4)]
    procs = [
        subprocess.Popen([sys.executable, str(HAMMER), redis_server.url, budget, "3", str(out), str(i)])
        for i, out in enumerate(outs)
    ]
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    admissions = sorted(tuple(json.loads(line)) for out in outs for line in out.read_text().splitlines())
    assert len({a[0] for a in admissions}) > 40  # plenty of distinct decisions
    assert {a[2] for a in admissions} == {"critical", "high", "normal", "low"}
    requests = [(t, 1) for t, _tokens, _p in admissions]
    tokens = [(t, tok) for t, tok, _p in admissions]
    assert max_in_closed_window(requests, WINDOW_US) <= REQUESTS.limit
    assert max_in_closed_window(tokens, WINDOW_US) <= TOKENS.limit
    span = admissions[-1][0] - admissions[0][0]
    allowed = {
        "requests": REQUESTS.burst + (REQUESTS.limit - REQUESTS.burst) * span / WINDOW_US,
        "tokens": TOKENS.burst + (TOKENS.limit - TOKENS.burst) * span / WINDOW_US,
    }
    used = {
        "requests": len(requests) / allowed["requests"],
        "tokens": sum(t for _, t in tokens) / allowed["tokens"],
    }
    assert max(used.values()) > 0.85, used


async def test_a_pause_holds_every_client_of_the_budget(redis_server: RedisServer) -> None:
    name = f"pause-{uuid.uuid4().hex}"
    budget = Budget.from_rates(name, requests_per_minute=6000)
    pod_a, pod_b = fast_redis(redis_server.url), fast_redis(redis_server.url)
    try:
        a, b = SharedLimiter(pod_a, budget), SharedLimiter(pod_b, budget)
        await a.pause(0.4)
        decision = await b.try_acquire("critical", 0)
        assert not decision.admitted and 300_000 < decision.retry_after_us <= 400_000
        asked = time.monotonic()
        reservation = await b.acquire("critical", 0, timeout_s=5)
        assert time.monotonic() - asked >= decision.retry_after_us / 1e6 - 0.05  # asked a little later
        assert reservation.slot_us - reservation.server_now_us > 250_000  # its slot is the pause's end
        await a.pause(10)
        await a.pause(0.1)  # a shorter pause never shortens a longer one
        with pytest.raises(LimiterTimeout):
            await b.acquire("low", 0, timeout_s=0.5)
    finally:
        await pod_a.aclose()
        await pod_b.aclose()


async def test_upstream_headers_tighten_the_budget_and_pause_at_zero(redis_server: RedisServer) -> None:
    name = f"headers-{uuid.uuid4().hex}"
    budget = Budget.from_rates(name, requests_per_minute=600, tokens_per_minute=100_000)
    client = fast_redis(redis_server.url)
    try:
        limiter = SharedLimiter(client, budget)
        await limiter.observe_headers(
            {
                "x-ratelimit-limit-requests": "60",
                "x-ratelimit-limit-tokens": "200000",
                "x-ratelimit-remaining-requests": "59",
                "x-ratelimit-reset-requests": "1s",
            }
        )
        learned = {name: b.override for name, b in (await stored(client, name)).buckets}
        assert learned == {"rpm": 60, "tpm": 0}  # tokens: provider allows more
        # burst shrinks to 5% of 60 = 3, a fresh bucket holds half of it (one): the 2nd immediate
        # request must wait a refill (~1 s), not 1/600 min
        assert (await limiter.try_acquire("critical", 1)).admitted
        denied = await limiter.try_acquire("critical", 1)
        assert not denied.admitted and denied.retry_after_us > 900_000
        # remaining 0 of tokens empties the tokens bucket only, for one refill, not the 6 min reset
        other = SharedLimiter(
            client,
            Budget.from_rates(f"h2-{uuid.uuid4().hex}", requests_per_minute=600, tokens_per_minute=100_000),
        )
        await other.observe_headers({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"})
        held = await other.try_acquire("critical", 100)
        assert not held.admitted and 50_000 < held.retry_after_us < 100_000  # 100 tokens of refill
        await other.observe_headers(
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "3s"}
        )
        held = await other.try_acquire("critical", 1)
        assert not held.admitted and held.retry_after_us < 200_000  # one request's refill, not 3 s
    finally:
        await client.aclose()


async def test_bulk_traffic_cannot_take_the_critical_reserve(redis_server: RedisServer) -> None:
    # a 10 min window: no unit refills while the test runs
    budget = Budget(f"reserve-{uuid.uuid4().hex}", (LimitParams("rpm", 1000, 600_000_000, 20),))
    client = fast_redis(redis_server.url)
    try:
        limiter = SharedLimiter(client, budget, reserve_fraction=0.25)
        admitted_low = 0
        while (await limiter.try_acquire("low", 0)).admitted:
            admitted_low += 1
        assert admitted_low == 5  # a fresh bucket holds 10 of 20; low may fill it to 15 (20 - 25 %)
        for _ in range(5):
            assert (await limiter.try_acquire("critical", 0)).admitted
        assert not (await limiter.try_acquire("critical", 0)).admitted
    finally:
        await client.aclose()


async def test_deadline_and_oversized_requests(redis_server: RedisServer) -> None:
    budget = Budget(f"dl-{uuid.uuid4().hex}", (LimitParams("tpm", 1000, 60_000_000, 100, "tokens"),))
    client = fast_redis(redis_server.url)
    try:
        limiter = SharedLimiter(client, budget)
        with pytest.raises(RequestTooLarge, match="larger than budget"):
            await limiter.acquire("critical", 101, timeout_s=1)
        await limiter.acquire("critical", 50, timeout_s=1)  # a fresh bucket holds half its burst
        start = time.monotonic()
        with pytest.raises(LimiterTimeout) as info:
            await limiter.acquire("critical", 50, timeout_s=0.2)
        assert (
            time.monotonic() - start < 0.2
        )  # fails at once: the exact slot is known to be past the deadline
        assert 3.0 < info.value.retry_after_s < 3.5  # 50 tokens at 900 a minute
        # the refusal charged nothing: a smaller request still fits in the same wait
        assert not (await limiter.try_acquire("critical", 50)).too_large
    finally:
        await client.aclose()


async def test_unused_tokens_are_not_refunded_unless_the_upstream_counts_actual_usage(
    redis_server: RedisServer,
) -> None:
    """OpenAI charges max_tokens up front and keeps it: so does the limiter by default."""
    client = fast_redis(redis_server.url)
    try:
        for refund, admitted_after in ((False, False), (True, True)):
            budget = Budget.from_rates(f"refund-{uuid.uuid4().hex}", tokens_per_minute=6000)  # burst 300
            limiter = SharedLimiter(client, budget, refund_unused_tokens=refund)
            reservation = await limiter.acquire("critical", 150, timeout_s=1)  # a fresh bucket: 150
            await limiter.reconcile(reservation, 10)  # the response used 10 of the 150 reserved
            decision = await limiter.try_acquire("critical", 100)
            assert decision.admitted is admitted_after
    finally:
        await client.aclose()


async def test_a_refused_request_releases_its_whole_reservation(redis_server: RedisServer) -> None:
    client = fast_redis(redis_server.url)
    try:
        limiter = SharedLimiter(
            client, Budget.from_rates(f"release-{uuid.uuid4().hex}", tokens_per_minute=6000)
        )
        reservation = await limiter.acquire("critical", 150, timeout_s=1)
        assert not (await limiter.try_acquire("critical", 100)).admitted
        await limiter.release(reservation)
        assert (await limiter.try_acquire("critical", 100)).admitted
    finally:
        await client.aclose()


async def test_a_cancelled_wait_ends_even_when_redis_reports_the_cancel_as_a_timeout(
    redis_server: RedisServer,
) -> None:
    client = fast_redis(redis_server.url)
    try:
        limiter = SharedLimiter(
            client, Budget.from_rates(f"cancel-{uuid.uuid4().hex}", requests_per_minute=60)
        )

        swallowed = 0

        async def cancel_swallowed_by_redis(*_args: Any) -> Any:
            # As redis-py can on a busy loop: the cancellation arrives mid-call and comes out
            # as redis' TimeoutError, the CancelledError itself consumed.
            nonlocal swallowed
            asyncio.current_task().cancel()  # type: ignore[union-attr]
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                swallowed += 1
                raise RedisTimeoutError("Timeout reading from socket") from None

        limiter._batch_script._send = cancel_swallowed_by_redis  # type: ignore[method-assign]
        waiting = asyncio.create_task(limiter.acquire("normal", 1, timeout_s=5))

        def flusher_ended_by_the_swallowed_cancel() -> bool:
            flusher = limiter._flusher
            return swallowed >= 1 and flusher is not None and flusher.done()

        await async_eventually(
            flusher_ended_by_the_swallowed_cancel, 2, "the limiter's call cancelled mid-call"
        )
        assert not limiter.degraded  # a cancel is not an outage
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiting, 3)
    finally:
        await client.aclose()


async def test_callers_stop_waiting_at_their_deadlines_while_the_script_call_hangs(
    redis_server: RedisServer,
) -> None:
    """One timer serves every waiting caller's deadline: the nearest first, then the next, for
    callers in the batch under way and in the next one alike."""
    client = fast_redis(redis_server.url)
    try:
        limiter = SharedLimiter(client, Budget.from_rates(f"hang-{uuid.uuid4().hex}", requests_per_minute=60))
        hung = asyncio.Event()

        async def hang(*_args: Any) -> Any:
            hung.set()
            await asyncio.Event().wait()

        limiter._batch_script._send = hang  # type: ignore[method-assign]
        in_flight = asyncio.create_task(limiter.acquire("normal", 1, timeout_s=0.3))
        await asyncio.wait_for(hung.wait(), 5)
        later = asyncio.create_task(limiter.acquire("normal", 1, timeout_s=0.6))  # the next batch
        sooner = asyncio.create_task(limiter.acquire("normal", 1, timeout_s=0.1))
        for task in (sooner, in_flight, later):
            with pytest.raises(LimiterTimeout):
                await asyncio.wait_for(task, 5)
        assert not limiter.degraded  # the call is still under way: no Redis error yet
        assert limiter._flusher is not None
        limiter._flusher.cancel()
    finally:
        await client.aclose()


async def test_a_caller_whose_script_call_was_cancelled_under_it_still_stops_at_its_deadline(
    redis_server: RedisServer,
) -> None:
    client = fast_redis(redis_server.url)
    try:
        limiter = SharedLimiter(
            client, Budget.from_rates(f"orphan-{uuid.uuid4().hex}", requests_per_minute=60)
        )

        async def cancelled_mid_call(*_args: Any) -> Any:
            asyncio.current_task().cancel()  # type: ignore[union-attr]
            await asyncio.get_running_loop().create_future()  # a reply that never comes

        limiter._batch_script._send = cancelled_mid_call  # type: ignore[method-assign]
        with pytest.raises(LimiterTimeout):
            await asyncio.wait_for(limiter.acquire("normal", 1, timeout_s=0.3), 5)
    finally:
        await client.aclose()


async def test_the_batch_script_is_loaded_again_when_redis_lost_it(redis_server: RedisServer) -> None:
    client = fast_redis(redis_server.url)
    try:
        limiter = SharedLimiter(
            client, Budget.from_rates(f"noscript-{uuid.uuid4().hex}", requests_per_minute=6000)
        )
        await limiter.acquire("critical", 0, timeout_s=1)
        await client.script_flush()  # as a restarted Redis
        reservation = await limiter.acquire("critical", 0, timeout_s=1)
        assert not reservation.local and not limiter.degraded
    finally:
        await client.aclose()


async def test_a_first_script_call_loads_the_script_in_one_command(redis_server: RedisServer) -> None:
    """A process's first call sends the script itself (EVAL caches it), and so does the call after
    an EVALSHA that Redis answered NOSCRIPT (it lost its scripts): never SCRIPT LOAD, then EVALSHA
    again."""
    client = fast_redis(redis_server.url)
    limiter = SharedLimiter(client, Budget.from_rates(f"load-{uuid.uuid4().hex}", requests_per_minute=6000))
    try:
        for lost in (0, 1):  # a fresh process, then a Redis that lost its scripts
            await client.script_flush()
            await client.config_resetstat()
            await limiter.acquire("critical", 0, timeout_s=1)
            await limiter.acquire("critical", 0, timeout_s=1)
            stats = await client.info("commandstats")
            assert "cmdstat_script|load" not in stats, stats
            assert stats["cmdstat_eval"]["calls"] == 1, stats
            evalsha = stats["cmdstat_evalsha"]
            assert (evalsha["calls"], evalsha["failed_calls"]) == (1 + lost, lost), stats
    finally:
        await limiter.aclose()
        await client.aclose()


async def evalsha_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_waiters_get_slots_in_arrival_order_in_few_script_calls(redis_server: RedisServer) -> None:
    """Four 'processes' x 25 waiters on one budget of 100/s (burst 10): each waiter sleeps once
    until its slot; the slots of one process follow its arrival order; a few Redis commands per
    admission, although a second of reservations is more than normal's horizon."""
    budget = Budget(f"fifo-{uuid.uuid4().hex}", (LimitParams("rps", 100, 1_000_000, 10),))
    clients = [fast_redis(redis_server.url) for _ in range(4)]
    try:
        limiters = [SharedLimiter(c, budget) for c in clients]
        before = await evalsha_calls(clients[0])
        started = time.monotonic()
        per_process = await asyncio.gather(
            *(
                asyncio.gather(*(lim.acquire("normal", 1, timeout_s=10) for _ in range(25)))
                for lim in limiters
            )
        )
        took = time.monotonic() - started
        calls = await evalsha_calls(clients[0]) - before
        for reservations in per_process:
            slots = [r.slot_us for r in reservations]
            assert slots == sorted(slots)  # first come, first served
        every = sorted(r.slot_us for rs in per_process for r in rs)
        assert len(set(every)) > 90  # distinct slots, ~11 ms apart after the first half burst
        assert took < (every[-1] - every[0]) / 1e6 + 1.0
        assert calls / 100 <= 5, calls
    finally:
        for c in clients:
            await c.aclose()


async def test_a_cancelled_reservation_gives_its_slot_back(redis_server: RedisServer) -> None:
    client = fast_redis(redis_server.url)
    try:
        name = f"gb-{uuid.uuid4().hex}"
        limiter = SharedLimiter(client, Budget(name, (LimitParams("rps", 10, 1_000_000, 2),)))
        first = await limiter.acquire("critical", 0, timeout_s=1)  # the fresh bucket's one free unit
        sleeper = asyncio.create_task(limiter.acquire("critical", 0, timeout_s=5))

        async def reserved() -> bool:  # the sleeper's reservation moved the bucket on
            return await stored_tat(client, name, "rps") > first.reserved_tats[0]

        await async_eventually(reserved, 2, "the sleeper's reservation")
        sleeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeper
        # the give-back goes before any reservation of a later or the same batch
        after = await limiter.acquire("critical", 0, timeout_s=5)
        assert after.slot_us - after.server_now_us < 150_000  # the sleeper's slot, ~125 ms ahead
    finally:
        await client.aclose()


async def test_an_upstream_429_stops_callers_already_sleeping_on_a_reservation(
    redis_server: RedisServer,
) -> None:
    name = f"p429-{uuid.uuid4().hex}"
    budget = Budget(name, (LimitParams("rps", 2, 1_000_000, 1),))  # one request a second
    pod_a, pod_b = fast_redis(redis_server.url), fast_redis(redis_server.url)
    try:
        a, b = SharedLimiter(pod_a, budget), SharedLimiter(pod_b, budget)
        first = await a.acquire("critical", 0, timeout_s=1)
        sleeping = asyncio.create_task(a.acquire("critical", 0, timeout_s=10))

        async def reserved() -> bool:  # the sleeper holds its slot, ~1 s ahead
            return await stored_tat(pod_b, name, "rps") > first.reserved_tats[0]

        await async_eventually(reserved, 5, "the sleeper's reservation")
        await b.pause(2.0)  # another pod got a 429
        paused_at = time.monotonic()
        reservation = await sleeping
        assert time.monotonic() - paused_at >= 1.9  # it waited for the pause, not its old slot
        assert reservation.slot_us >= reservation.server_now_us
    finally:
        await pod_a.aclose()
        await pod_b.aclose()


def pushes_pauses(limiter: SharedLimiter) -> bool:
    """The limiter's subscription is up and a script call went after it: from then on every
    pause reaches it as a push (no Confirm call)."""
    return limiter._subscribed is not None and limiter._covered == limiter._subscribed


def recording(limiter: SharedLimiter) -> list[list[gcra.Op]]:
    """The ops of each script call the limiter makes from now on."""
    calls: list[list[gcra.Op]] = []
    run = limiter._run

    async def recorded(batch: list[Any]) -> list[str | int | bytes]:
        calls.append([r.op for r in batch])
        return await run(batch)

    limiter._run = recorded  # type: ignore[method-assign]
    return calls


async def test_a_429_stops_every_agent_of_the_budget_within_100ms_by_a_push(
    redis_server: RedisServer,
) -> None:
    """Agent A has callers sleeping on reservations 50 ms apart; agent B (its own connection) gets
    a 429 and pauses the budget for 1 s. None of A's callers starts later than 100 ms after the
    pause reached Redis and before it ends, and A learnt of it without a call of its own."""
    name = f"push-{uuid.uuid4().hex}"
    budget = Budget(name, (LimitParams("rps", 20, 1_000_000, 2),))
    pod_a, pod_b = fast_redis(redis_server.url), fast_redis(redis_server.url)
    a, b = SharedLimiter(pod_a, budget), SharedLimiter(pod_b, budget)
    try:
        await a.acquire("critical", 0, timeout_s=1)
        await async_eventually(lambda: a._subscribed is not None, 5, "A's pause subscription")
        await a.acquire("critical", 0, timeout_s=1)  # a call after the subscription: covered
        assert pushes_pauses(a)
        starts: list[float] = []

        async def caller() -> None:
            await a.acquire("critical", 0, timeout_s=10)
            starts.append(time.monotonic())

        callers = [asyncio.create_task(caller()) for _ in range(30)]  # slots over 1.5 s
        await async_eventually(lambda: len(starts) >= 3, 5, "the first callers' starts")
        calls = recording(a)
        before = time.monotonic()
        await b.pause(1.0)
        paused = time.monotonic()
        await asyncio.gather(*callers)
        held = [t for t in starts if before + 0.1 < t < paused + 0.9]
        assert not held, [round(t - before, 3) for t in held]
        assert len(starts) == 30  # all of them went after the pause
        assert not any(isinstance(op, gcra.Confirm) for ops in calls for op in ops)
    finally:
        await a.aclose()
        await b.aclose()
        await pod_a.aclose()
        await pod_b.aclose()


async def test_without_its_subscription_a_sleeping_caller_confirms_and_still_sees_the_pause(
    redis_server: RedisServer,
) -> None:
    """The pause channel's connection is killed (and not back for 30 s): a caller that slept on a
    reservation asks Redis when it wakes (Confirm) and waits for the pause instead of its slot."""
    name = f"nosub-{uuid.uuid4().hex}"
    budget = Budget(name, (LimitParams("rps", 2, 1_000_000, 1),))  # one request a second
    pod_a, pod_b = fast_redis(redis_server.url), fast_redis(redis_server.url)
    a, b = SharedLimiter(pod_a, budget, redis_retry_interval_s=30), SharedLimiter(pod_b, budget)
    try:
        await a.acquire("critical", 0, timeout_s=1)
        await async_eventually(lambda: a._subscribed is not None, 5, "A's pause subscription")
        await pod_b.client_kill_filter(_type="pubsub")
        await async_eventually(lambda: a._subscribed is None, 5, "A's subscription lost")
        calls = recording(a)
        sleeping = asyncio.create_task(a.acquire("critical", 0, timeout_s=10))
        await async_eventually(lambda: calls, 5, "the sleeper's reservation")
        await b.pause(2.0)
        paused_at = time.monotonic()
        await sleeping
        assert time.monotonic() - paused_at >= 1.9  # it waited for the pause, not its old slot
        assert any(isinstance(op, gcra.Confirm) for ops in calls for op in ops)
    finally:
        await a.aclose()
        await b.aclose()
        await pod_a.aclose()
        await pod_b.aclose()


async def test_a_reservation_that_will_take_a_ticket_rides_along_with_the_next_call(
    redis_server: RedisServer,
) -> None:
    """20 normal waiters of one process hold tickets up to ~2 s ahead; one more acquire, which
    the process knows will be refused for its horizon, makes no script call of its own: it goes
    with the next waiter coming back for its slot, and is served after all of them."""
    budget = Budget(f"ride-{uuid.uuid4().hex}", (LimitParams("rps", 10, 1_000_000, 2),))
    client = fast_redis(redis_server.url)
    limiter = SharedLimiter(client, budget)
    try:
        waiters = [asyncio.create_task(limiter.acquire("normal", 0, timeout_s=30)) for _ in range(20)]
        await async_eventually(lambda: "normal" in limiter._tails, 5, "the waiters' tickets")
        calls = recording(limiter)
        last = await limiter.acquire("normal", 0, timeout_s=30)
        firsts = [
            ops for ops in calls if any(isinstance(op, gcra.Reserve) and not op.returning for op in ops)
        ]
        assert len(firsts) == 1 and len(firsts[0]) > 1, calls  # sent once, with another op
        assert last.slot_us > max(w.slot_us for w in await asyncio.gather(*waiters))
    finally:
        await limiter.aclose()
        await client.aclose()


async def test_time_alone_does_not_make_room_while_the_class_holds_tickets_beyond_the_horizon(
    redis_server: RedisServer,
) -> None:
    """Agent B's 20 normal waiters keep the budget full (their tickets reach ~2.4 s ahead); agent
    A's one waiter takes a ticket behind them and A makes no call for a while. A's last reply,
    aged by the time since, shows room within the horizon, but B's waiters come back for it: A's
    next two first acquires, the second after the first has parked, go together in one script
    call, behind A's waiter."""
    budget = Budget(f"stale-{uuid.uuid4().hex}", (LimitParams("rps", 10, 1_000_000, 2),))
    pod_a, pod_b = fast_redis(redis_server.url), fast_redis(redis_server.url)
    a, b = SharedLimiter(pod_a, budget), SharedLimiter(pod_b, budget)
    try:
        crowd = [asyncio.create_task(b.acquire("normal", 0, timeout_s=30)) for _ in range(20)]
        await async_eventually(lambda: "normal" in b._tails, 5, "B's waiters' tickets")
        waiter = asyncio.create_task(a.acquire("normal", 0, timeout_s=30))
        await async_eventually(lambda: "normal" in a._tails, 5, "A's waiter's ticket")
        calls = recording(a)

        def aged_view_has_room() -> bool:
            """A's last reply, aged to now, admits a normal op within its horizon: what the
            ride-along once asked, and the moment B's returning waiters take that room."""
            tats, seen_now, received = a._seen
            now = seen_now + int((a._monotonic() - received) * 1_000_000)
            limits = gcra.Limits(a.budget.limits, tuple(None for _ in tats), a._reserve)
            horizon = gcra.max_ahead_us("normal", 30_000_000, False)
            return gcra.reserve(tats, now, a._costs(0), limits, False, horizon, a._pause_until_us).admitted

        await async_eventually(aged_view_has_room, 5, "A's view, aged, to show room within the horizon")
        first = asyncio.create_task(a.acquire("normal", 0, timeout_s=30))
        # it waits for A's next call instead of going alone; the second then goes with it
        await async_eventually(lambda: a._parked, 5, "A's first acquire parked for A's next call")
        second = asyncio.create_task(a.acquire("normal", 0, timeout_s=30))
        newcomers = await asyncio.gather(first, second)
        firsts = [sum(isinstance(op, gcra.Reserve) and not op.returning for op in ops) for ops in calls]
        assert [n for n in firsts if n] == [2], calls  # both in one call
        assert min(r.slot_us for r in newcomers) > (await waiter).slot_us  # behind A's waiter
        await asyncio.gather(*crowd)
    finally:
        await a.aclose()
        await b.aclose()
        await pod_a.aclose()
        await pod_b.aclose()


async def test_the_live_agents_are_counted_and_their_set_expires(redis_server: RedisServer) -> None:
    name = f"agents-{uuid.uuid4().hex}"
    budget = Budget.from_rates(name, requests_per_minute=6000)
    pod_a, pod_b = fast_redis(redis_server.url), fast_redis(redis_server.url)
    a, b = SharedLimiter(pod_a, budget), SharedLimiter(pod_b, budget)
    try:
        await a.acquire("critical", 0, timeout_s=1)
        await b.acquire("critical", 0, timeout_s=1)
        assert (a.agents, b.agents) == (1, 2)  # each heartbeat counts the agents heard of
        ttl = await pod_a.pttl(agents_key(name))
        assert 0 < ttl <= 4 * AGENT_TTL_S * 1000  # a first heartbeat already bounds the set's life
    finally:
        await a.aclose()
        await b.aclose()
        await pod_a.aclose()
        await pod_b.aclose()


async def test_utilization_reports_the_share_of_the_budget_used(redis_server: RedisServer) -> None:
    client = fast_redis(redis_server.url)
    metrics = AgentMetrics(process_collector=False)
    try:
        budget = Budget(f"util-{uuid.uuid4().hex}", (LimitParams("rpm", 600, 60_000_000, 30),))
        limiter = SharedLimiter(client, budget, metrics=metrics)
        for _ in range(15):
            await limiter.acquire("critical", 0, timeout_s=1)
        value = metrics.registry.get_sample_value(
            metric_names.LIMITER_BUDGET_UTILIZATION, {"budget": budget.name, "window": "rpm"}
        )
        assert value is not None and 15 / 570 * 0.99 < value <= 15 / 570  # 15 of 570 sustained a minute
    finally:
        await client.aclose()


async def test_redis_paused_10s_degrades_to_the_live_agents_share_and_charges_it_back(tmp_path: Path) -> None:
    """Two agents of the budget heartbeat; redis-server is stopped (SIGSTOP) for 10 s. No call
    blocks past its deadline; critical admissions stay within 1/2 of the budget per agent (the
    documented bound: the burst share plus the refill share); low fails closed; when Redis
    returns, the local admissions are charged to the shared bucket."""
    server = RedisServer(tmp_path)
    server.start()
    name = f"deg-{uuid.uuid4().hex}"
    rpm = LimitParams("rpm", 600, 60_000_000, 60)
    budget = Budget(name, (rpm,))
    pod_a, pod_b = fast_redis(server.url), fast_redis(server.url)
    a = SharedLimiter(pod_a, budget, redis_retry_interval_s=0.5)
    b = SharedLimiter(pod_b, budget)
    try:
        await a.acquire("critical", 0, timeout_s=1)
        await b.acquire("critical", 0, timeout_s=1)
        deadline = time.monotonic() + HEARTBEAT_INTERVAL_S + 2
        while a.agents != 2:  # until its next heartbeat counts both
            assert time.monotonic() < deadline, a.agents
            await a.acquire("critical", 0, timeout_s=1)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        local = 0
        try:
            while time.monotonic() - stopped < 10:
                call = time.monotonic()
                try:
                    r = await a.acquire("critical", 0, timeout_s=0.4)
                    local += int(r.local)
                except LimiterTimeout:
                    pass
                # never past the deadline (plus scheduling on a busy machine)
                assert time.monotonic() - call < 0.4 + 0.25
            with pytest.raises(LimiterTimeout):
                await a.acquire("low", 0, timeout_s=0.3)
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert a.degraded or local > 0
        # the local share: 600/2 a minute with a burst of 30 -> at most 30 + 285/60 * 10 s
        assert 0 < local <= 30 + 285 * 10 / 60 + 1
        back = await a.acquire("normal", 0, timeout_s=5)
        assert not back.local
        tat = await stored_tat(pod_b, name, "rpm")
        server_now = back.server_now_us
        # the local admissions were charged: the shared bucket is that far ahead of now
        charged_us = local * 60_000_000 / (600 - 60)
        assert tat - server_now >= charged_us - 2 * 60_000_000 / 540 - 6_000_000
    finally:
        await pod_a.aclose()
        await pod_b.aclose()
        server.stop()


async def test_aclose_sends_the_give_backs_of_cancelled_callers_first(redis_server: RedisServer) -> None:
    client = fast_redis(redis_server.url)
    name = f"close-{uuid.uuid4().hex}"
    limiter = SharedLimiter(client, Budget(name, (LimitParams("rps", 10, 1_000_000, 2),)))
    try:
        first = await limiter.acquire("critical", 0, timeout_s=1)
        sleeper = asyncio.create_task(limiter.acquire("critical", 0, timeout_s=5))

        async def reserved() -> bool:
            return await stored_tat(client, name, "rps") > first.reserved_tats[0]

        await async_eventually(reserved, 2, "the sleeper's reservation")
        sleeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeper
        await limiter.aclose()
        assert await stored_tat(client, name, "rps") == first.reserved_tats[0]
    finally:
        await client.aclose()


async def test_the_batch_packs_reservations_as_their_op_args() -> None:
    """The cached packing of reservations (all but the deadline kept from call to call) sends the
    same bytes as packing every op's _op_args, also after the cache was cleared."""
    budget = Budget.from_rates(f"pack-{uuid.uuid4().hex}", requests_per_minute=600, tokens_per_minute=90_000)
    limiter = SharedLimiter(aioredis.Redis(port=1), budget)
    sent: list[tuple[int, bytes]] = []

    async def script(count: int, args: bytes) -> list[int]:
        sent.append((count, args))
        return []

    limiter._batch_script = script  # type: ignore[assignment]
    limiter._next_heartbeat = float("inf")  # no heartbeat fields to compare
    ops: list[gcra.Op] = [
        gcra.Reserve(priority, ahead, (1, cost), deadline, returning)
        for priority, ahead, cost, deadline, returning in [
            ("normal", 1_000_000, 5, 3_600_000_000, False),
            ("normal", 1_000_000, 5, 12_345, False),  # the cached head, another deadline
            ("low", 500_000, 5, 9, True),
            ("critical", 77, 1, 77, False),
            *(("high", ahead, 2, ahead, False) for ahead in range(300)),  # fills the cache past its bound
            ("normal", 1_000_000, 5, 1, False),
        ]
    ]
    ops.insert(2, gcra.GiveBack((10, 20), (1, 5)))
    for op in ops:
        await limiter._run([_Request(op, None)])
    expected = [
        (5 + 8, _resp(("", _AGENT_TTL_US, "", pause_channel(budget.name), 1, *_op_args(op, 2)))) for op in ops
    ]
    assert sent == expected


# -- leases: while the budget is ample a busy process spends admissions without a script call ----

# the most a minute the GCRA takes, and its default burst of one second: leases of up to 62,500
AMPLE = LimitParams("rpm", 30_000_000, 60_000_000, 500_000)


async def until_leased(
    limiter: SharedLimiter, priority: str = "normal", tokens: int = 0, timeout_s: float = 10.0
) -> int:
    """Acquire (yielding between) until one comes from a lease; how many it took.

    Bounded in time, not in acquires: a fresh bucket starts half full (gcra.fresh_tat) and a lease
    needs half the tolerance free, so the first lease waits for the refill, which a fast machine's
    acquires can outrun for thousands of calls."""
    deadline = time.monotonic() + timeout_s
    taken = 0
    while time.monotonic() < deadline:
        taken += 1
        if (await limiter.acquire(priority, tokens, timeout_s=5)).leased:
            return taken
        await asyncio.sleep(0)
    raise AssertionError(f"no lease in {timeout_s:g} s ({taken} acquires)")


async def test_an_ample_budget_is_spent_from_leases_with_few_script_calls(redis_server: RedisServer) -> None:
    """One caller acquiring in a loop: after the first few script calls nearly every admission
    comes from a lease (no network), renewed ahead in the background, never two asks at once."""
    client = fast_redis(redis_server.url)
    limiter = SharedLimiter(client, Budget(f"lease-{uuid.uuid4().hex}", (AMPLE,)))
    try:
        await until_leased(limiter)
        before = await evalsha_calls(client)
        asks = 0
        run = limiter._run

        async def one_ask_at_a_time(batch: list[_Request]) -> list[str | int | bytes]:
            nonlocal asks
            in_batch = sum(isinstance(r.op, gcra.Lease) for r in batch)
            asks += in_batch
            assert in_batch + sum(isinstance(r.op, gcra.Lease) for r in limiter._pending) <= 1
            return await run(batch)

        limiter._run = one_ask_at_a_time  # type: ignore[method-assign]
        leased = 0
        for _ in range(3_000):
            leased += (await limiter.acquire("normal", 0, timeout_s=5)).leased
            await asyncio.sleep(0)
        calls = await evalsha_calls(client) - before
        assert leased >= 0.97 * 3_000, leased
        assert asks > 0 and calls <= 0.03 * 3_000, (asks, calls)
        stats = limiter.lease_stats
        assert stats.granted >= stats.spent >= leased
    finally:
        await limiter.aclose()
        await client.aclose()


async def test_leased_and_reserved_admissions_of_many_agents_never_exceed_the_budget(
    redis_server: RedisServer,
) -> None:
    """Four agents x eight callers on a budget whose burst is long enough for leases, at half the
    budget for a second, then saturating it for 1.5 s: leased and reserved admissions together,
    at their Redis-clock instants (a leased one's lies between its lease's grant and the end of
    its life), never exceed the limit in any closed window, and both kinds occur (the budget
    goes from ample to saturated)."""
    params = LimitParams("rps", 3_000, 1_000_000, 600)  # a burst of 250 ms: leases live 30 ms
    budget = Budget(f"lease-window-{uuid.uuid4().hex}", (params,))
    clients = [fast_redis(redis_server.url) for _ in range(4)]
    limiters = [SharedLimiter(c, budget, lease_s=0.03) for c in clients]
    admissions: list[tuple[int, int]] = []
    kinds: list[bool] = []
    light_until = time.monotonic() + 1.0
    until = light_until + 1.5

    async def caller(limiter: SharedLimiter) -> None:
        while time.monotonic() < until:
            try:
                r = await limiter.acquire("normal", 0, timeout_s=max(until - time.monotonic(), 0.0))
            except LimiterTimeout:
                return
            admissions.append((r.slot_us, 1))
            kinds.append(r.leased)
            # half the budget for a second (ample: leases), then all they can get (saturated)
            await asyncio.sleep(0.02 if time.monotonic() < light_until else 0)

    try:
        await asyncio.gather(*(caller(lim) for lim in limiters for _ in range(8)))
        assert max_in_closed_window(sorted(admissions), params.window_us) <= params.limit
        assert sum(kinds) > 100 and len(kinds) - sum(kinds) > 100, (sum(kinds), len(kinds))
    finally:
        for lim, c in zip(limiters, clients, strict=True):
            await lim.aclose()
            await c.aclose()


async def test_contended_waiters_take_no_lease_and_keep_their_order(redis_server: RedisServer) -> None:
    """Four agents x 50 waiters on a budget ample enough for leases when idle: once the waiters
    hold tickets the script grants no lease; each agent's slots follow its arrival order."""
    budget = Budget(f"lease-fifo-{uuid.uuid4().hex}", (LimitParams("rpm", 6_000, 60_000_000, 100),))
    clients = [fast_redis(redis_server.url) for _ in range(4)]
    limiters = [SharedLimiter(c, budget) for c in clients]
    try:
        per_agent = await asyncio.gather(
            *(
                asyncio.gather(*(lim.acquire("normal", 0, timeout_s=10) for _ in range(50)))
                for lim in limiters
            )
        )
        for reservations in per_agent:
            slots = [r.slot_us for r in reservations]
            assert slots == sorted(slots)
            assert not any(r.leased for r in reservations)
        assert sum(lim.lease_stats.granted for lim in limiters) <= 4 * gcra.LEASE_MIN * 2
    finally:
        for lim, c in zip(limiters, clients, strict=True):
            await lim.aclose()
            await c.aclose()


async def test_a_429_voids_every_agents_leases_within_100ms(redis_server: RedisServer) -> None:
    """Agent A spends leases; agent B gets a 429 and pauses the budget for 1 s. No admission of A
    starts later than 100 ms after the pause and before its end: the push voids A's leases."""
    budget = Budget(f"lease-pause-{uuid.uuid4().hex}", (AMPLE,))
    pod_a, pod_b = fast_redis(redis_server.url), fast_redis(redis_server.url)
    a, b = SharedLimiter(pod_a, budget), SharedLimiter(pod_b, budget)
    try:
        await until_leased(a)
        starts: list[tuple[float, bool]] = []
        stop = asyncio.Event()

        async def caller() -> None:
            while not stop.is_set():
                r = await a.acquire("normal", 0, timeout_s=10)
                starts.append((time.monotonic(), r.leased))
                await asyncio.sleep(0.01)  # a lease lasts about its life: longer than 100 ms

        callers = [asyncio.create_task(caller()) for _ in range(4)]
        await async_eventually(lambda: sum(leased for _, leased in starts) >= 20, 5, "A on a lease")
        before = time.monotonic()
        await b.pause(1.0)
        paused = time.monotonic()
        await async_eventually(
            lambda: any(t > paused + 0.9 for t, _ in starts), 5, "A admitted again as the pause ends"
        )
        stop.set()
        await asyncio.gather(*callers)
        held = [t for t, _ in starts if before + 0.1 < t < paused + 0.9]
        assert not held, [round(t - before, 3) for t in held]
        assert any(t > paused + 0.9 for t, _ in starts)  # A goes on after the pause
        assert a.lease_stats.lost > 0  # the voided lease's admissions: charged, never spent
    finally:
        await a.aclose()
        await b.aclose()
        await pod_a.aclose()
        await pod_b.aclose()


async def test_a_lease_is_spent_while_redis_is_down_until_it_expires_and_never_renewed(
    tmp_path: Path,
) -> None:
    """redis-server is stopped (SIGSTOP) while an agent holds a lease of 1 s: low (which fails
    closed in degraded mode) is still admitted from the lease until its life ends, never after,
    and no lease is asked for while the limiter is degraded."""
    server = RedisServer(tmp_path)
    server.start()
    client = fast_redis(server.url)
    hourly = LimitParams("rph", 36_000_000, 3_600_000_000, 600_000)  # a burst of a minute
    budget = Budget(f"lease-down-{uuid.uuid4().hex}", (hourly,))
    limiter = SharedLimiter(client, budget, lease_s=1.0, redis_retry_interval_s=0.5)
    try:
        seconds, micros = await client.time()
        t = seconds * 1_000_000 + micros  # a full bucket (a fresh one starts half full: no lease)
        await client.set(state_key(budget.name), f"s1 0 0 0 0 0 0 0 rph {t - 1} {t + 100_000_000} 0 {t} 0")
        await until_leased(limiter, "low")
        for _ in range(300):  # a demand of a few hundred a lease life: leases that large
            await limiter.acquire("low", 0, timeout_s=5)
            await asyncio.sleep(0)
        await async_eventually(lambda: not limiter._lease_asked, 5, "no ask in flight")
        asked_while_degraded = []
        submit = limiter._submit

        def recorded(op: gcra.Op, wait: bool, **kwargs: Any) -> _Request:
            if limiter.degraded and isinstance(op, gcra.Lease):
                asked_while_degraded.append(op)
            return submit(op, wait, **kwargs)

        limiter._submit = recorded  # type: ignore[method-assign]
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            ends = max(lease.until for lease in limiter._leases)
            leased_after_end, leased_before_end, refused, tried_after_end = 0, 0, 0, 0
            deadline = time.monotonic() + 10
            # Until the lease's life is over and several acquires were tried past it.
            while tried_after_end < 5 or refused == 0:
                seen = f"{leased_before_end=} {leased_after_end=} {refused=} {tried_after_end=}"
                assert time.monotonic() < deadline, f"timed out after 10s; last seen: {seen}"
                tried_after_end += time.monotonic() > ends
                try:
                    r = await limiter.acquire("low", 0, timeout_s=0.3)
                    if r.leased:
                        if time.monotonic() > ends:
                            leased_after_end += 1
                        else:
                            leased_before_end += 1
                except LimiterTimeout:
                    refused += 1
                await asyncio.sleep(0.005)  # pacing, so the lease is not spent in the first ms
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert leased_before_end > 10 and leased_after_end == 0 and refused > 0
        assert limiter.degraded or refused > 0
        assert not asked_while_degraded
    finally:
        await limiter.aclose()
        await client.aclose()
        server.stop()


async def test_a_lease_in_tokens_serves_the_requests_it_holds_room_for(redis_server: RedisServer) -> None:
    """A budget with a token limit: a lease holds requests and tokens (the cost of the request
    that asked, times its admissions); a request costing more tokens than the lease holds goes to
    Redis, and a lease is never spent below zero in any limit."""
    budget = Budget(
        f"lease-tokens-{uuid.uuid4().hex}",
        (AMPLE, LimitParams("tpm", 60_000_000, 60_000_000, 3_000_000, "tokens")),
    )
    client = fast_redis(redis_server.url)
    limiter = SharedLimiter(client, budget)
    try:
        await until_leased(limiter, tokens=100)
        held = sum(lease.left[1] for lease in limiter._leases)
        big = await limiter.acquire("normal", held + 1, timeout_s=5)
        assert not big.leased  # more tokens than any lease holds: a reservation
        small = await limiter.acquire("normal", 50, timeout_s=5)
        assert small.leased  # fewer tokens than a lease admission's: from the lease
        assert all(units >= 0 for lease in limiter._leases for units in lease.left)
    finally:
        await limiter.aclose()
        await client.aclose()


async def test_admissions_from_leases_count_in_the_utilization(redis_server: RedisServer) -> None:
    client = fast_redis(redis_server.url)
    metrics = AgentMetrics(process_collector=False)
    budget = Budget(f"lease-util-{uuid.uuid4().hex}", (AMPLE,))
    limiter = SharedLimiter(client, budget, metrics=metrics)
    try:
        taken = await until_leased(limiter)
        for _ in range(500):
            await limiter.acquire("normal", 0, timeout_s=5)
            await asyncio.sleep(0)
        assert limiter.lease_stats.spent > 400
        await limiter.try_acquire("critical", 0)  # a script call: the latest count of what was used
        value = metrics.registry.get_sample_value(
            metric_names.LIMITER_BUDGET_UTILIZATION, {"budget": budget.name, "window": "rpm"}
        )
        sustained = AMPLE.limit - AMPLE.burst
        assert value is not None and value >= (taken + 500) / sustained * 0.99
    finally:
        await limiter.aclose()
        await client.aclose()


async def test_a_lease_whose_grant_comes_after_a_pause_push_is_void(redis_server: RedisServer) -> None:
    """The reply granting a lease and the push of a pause from another agent travel on two
    connections: when the push is handled first, the lease (granted before the pause) is void."""
    client = fast_redis(redis_server.url)
    limiter = SharedLimiter(client, Budget(f"lease-race-{uuid.uuid4().hex}", (AMPLE,)))
    try:
        await until_leased(limiter)
        run = limiter._run
        granting: list[bool] = []

        async def push_first(batch: list[_Request]) -> list[str | int | bytes]:
            reply = await run(batch)
            if any(isinstance(r.op, gcra.Lease) for r in batch):
                granting.append(True)
                limiter._void_leases()  # what the listener does on a pause's push
            return reply

        limiter._run = push_first  # type: ignore[method-assign]
        lost = limiter.lease_stats.lost
        for _ in range(10_000):
            if granting:
                break
            await limiter.acquire("normal", 0, timeout_s=5)
            await asyncio.sleep(0)
        await async_eventually(lambda: not limiter._lease_asked, 5, "the ask answered")
        assert not limiter._leases and limiter.lease_stats.lost > lost
    finally:
        await limiter.aclose()
        await client.aclose()


async def test_closing_ends_the_pause_subscription_whose_subscribe_lost_the_cancel(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py writes through asyncio.wait_for, which on Python 3.11 drops a cancel that meets the
    write's end (CPython gh-86296): a SUBSCRIBE under way when the agent closes returns normally,
    and the listener goes on to wait for messages. aclose() must still end it, or the agent's
    SIGTERM waits for the kill."""
    subscribing = asyncio.Event()
    cancels_lost = 0
    real_subscribe = PubSub.subscribe

    async def subscribe_that_loses_a_cancel(self: PubSub, *channels: str) -> None:
        nonlocal cancels_lost
        subscribing.set()
        try:
            await asyncio.Event().wait()  # the SUBSCRIBE's write still under way
        except asyncio.CancelledError:
            cancels_lost += 1
        await real_subscribe(self, *channels)

    monkeypatch.setattr(PubSub, "subscribe", subscribe_that_loses_a_cancel)
    client = fast_redis(redis_server.url)
    limiter = SharedLimiter(client, Budget.from_rates(f"close-{uuid.uuid4().hex}", requests_per_minute=6000))
    try:
        await limiter.acquire("critical", 0, timeout_s=1)  # starts the pause subscription
        await asyncio.wait_for(subscribing.wait(), 5)
        listener = limiter._listener
        assert listener is not None
        closing = asyncio.create_task(limiter.aclose())
        done, _ = await asyncio.wait({closing}, timeout=5)
        if not done:
            listener.cancel()  # a second cancel reaches it in get_message; let the test end
            await asyncio.wait({closing}, timeout=5)
        assert (bool(done), cancels_lost, listener.done()) == (True, 1, True)
    finally:
        await client.aclose()
