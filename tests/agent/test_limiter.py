"""The shared limiter against a real Redis: many processes, pauses, upstream headers, degraded mode."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import TimeoutError as RedisTimeoutError

from tars_agent.gcra import LimitParams
from tars_agent.limiter import Budget, LimiterTimeout, RequestTooLarge, SharedLimiter, budget_keys

from .conftest import RedisServer, free_port
from .limiter_budget import REQUESTS, TOKENS, WINDOW_US
from .test_gcra import max_in_closed_window

HAMMER = Path(__file__).with_name("limiter_hammer.py")


def fast_redis(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url, socket_timeout=0.25, socket_connect_timeout=0.25, retry=Retry(NoBackoff(), 0)
    )


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
        decision, _ = await b.try_acquire("critical", 0)
        assert not decision.admitted and 300_000 < decision.retry_after_us <= 400_000
        start = time.monotonic()
        await b.acquire("critical", 0, timeout_s=5)
        assert time.monotonic() - start >= decision.retry_after_us / 1e6
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
        _pause_key, overrides_key = budget_keys(name)
        assert await client.hgetall(overrides_key) == {b"rpm": b"60"}  # tokens: provider allows more
        # burst shrinks to 5% of 60 = 3: the 4th immediate request must wait a refill (~1 s), not 1/600 min
        for _ in range(3):
            assert (await limiter.try_acquire("critical", 1))[0].admitted
        denied, _ = await limiter.try_acquire("critical", 1)
        assert not denied.admitted and denied.retry_after_us > 900_000
        await limiter.observe_headers(
            {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"}
        )
        paused, _ = await limiter.try_acquire("critical", 1)
        assert not paused.admitted and paused.retry_after_us > 350_000_000
    finally:
        await client.aclose()


async def test_bulk_traffic_cannot_take_the_critical_reserve(redis_server: RedisServer) -> None:
    budget = Budget(f"reserve-{uuid.uuid4().hex}", (LimitParams("rpm", 1000, 60_000_000, 20),))
    client = fast_redis(redis_server.url)
    try:
        limiter = SharedLimiter(client, budget, reserve_fraction=0.25)
        admitted_low = 0
        while (await limiter.try_acquire("low", 0))[0].admitted:
            admitted_low += 1
        assert admitted_low == 15  # 20 - 25 %
        for _ in range(5):
            assert (await limiter.try_acquire("critical", 0))[0].admitted
        assert not (await limiter.try_acquire("critical", 0))[0].admitted
    finally:
        await client.aclose()


async def test_deadline_and_oversized_requests(redis_server: RedisServer) -> None:
    budget = Budget(f"dl-{uuid.uuid4().hex}", (LimitParams("tpm", 1000, 60_000_000, 100, "tokens"),))
    client = fast_redis(redis_server.url)
    try:
        limiter = SharedLimiter(client, budget)
        with pytest.raises(RequestTooLarge, match="larger than budget"):
            await limiter.acquire("critical", 101, timeout_s=1)
        await limiter.acquire("critical", 100, timeout_s=1)
        start = time.monotonic()
        with pytest.raises(LimiterTimeout) as info:
            await limiter.acquire("critical", 50, timeout_s=0.2)
        assert time.monotonic() - start < 0.2  # fails at once: the exact wait is known to exceed the deadline
        assert info.value.retry_after_s > 0.2
    finally:
        await client.aclose()


async def test_degraded_mode_per_priority_and_recovery(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, port=free_port())
    budget = Budget(f"deg-{uuid.uuid4().hex}", (LimitParams("rpm", 600, 60_000_000, 60),))
    client = fast_redis(server.url)
    limiter = SharedLimiter(client, budget, expected_pool_size=10, redis_retry_interval_s=0.3)
    try:
        # Redis is down: critical and high use the local share (60/10 with burst 6), promptly
        start = time.monotonic()
        local = [await limiter.acquire("critical", 0, timeout_s=1) for _ in range(3)]
        local += [await limiter.acquire("high", 0, timeout_s=1) for _ in range(2)]
        assert all(r.local for r in local) and limiter.degraded
        assert time.monotonic() - start < 1.0  # a short timeout, not a stall per call
        # normal and low fail closed: they wait for Redis until their deadline
        with pytest.raises(LimiterTimeout):
            await limiter.acquire("low", 0, timeout_s=0.5)
        server.start()
        back = await limiter.acquire("low", 0, timeout_s=5)
        assert not back.local and back.server_now_us > 0 and not limiter.degraded
    finally:
        await client.aclose()
        server.stop()


async def test_unused_tokens_are_not_refunded_unless_the_upstream_counts_actual_usage(
    redis_server: RedisServer,
) -> None:
    """OpenAI charges max_tokens up front and keeps it: so does the limiter by default."""
    client = fast_redis(redis_server.url)
    try:
        for refund, admitted_after in ((False, False), (True, True)):
            budget = Budget.from_rates(f"refund-{uuid.uuid4().hex}", tokens_per_minute=6000)  # burst 300
            limiter = SharedLimiter(client, budget, refund_unused_tokens=refund)
            reservation = await limiter.acquire("critical", 300, timeout_s=1)
            await limiter.reconcile(reservation, 10)  # the response used 10 of the 300 reserved
            decision, _ = await limiter.try_acquire("critical", 200)
            assert decision.admitted is admitted_after
    finally:
        await client.aclose()


async def test_a_refused_request_releases_its_whole_reservation(redis_server: RedisServer) -> None:
    client = fast_redis(redis_server.url)
    try:
        limiter = SharedLimiter(
            client, Budget.from_rates(f"release-{uuid.uuid4().hex}", tokens_per_minute=6000)
        )
        reservation = await limiter.acquire("critical", 300, timeout_s=1)
        assert not (await limiter.try_acquire("critical", 200))[0].admitted
        await limiter.release(reservation)
        assert (await limiter.try_acquire("critical", 200))[0].admitted
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

        async def cancel_swallowed_by_redis(priority: str, tokens: int) -> Any:
            # As redis-py can on a busy loop: the cancellation arrives mid-call and comes out
            # as redis' TimeoutError, the CancelledError itself consumed.
            asyncio.current_task().cancel()  # type: ignore[union-attr]
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                raise RedisTimeoutError("Timeout reading from socket") from None

        limiter.try_acquire = cancel_swallowed_by_redis  # type: ignore[method-assign]
        waiting = asyncio.create_task(limiter.acquire("normal", 1, timeout_s=5))
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiting, 3)
    finally:
        await client.aclose()
