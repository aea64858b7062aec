"""Every rate limit the AgentPool API accepts, the agent runs: one definition of the bounds."""

from __future__ import annotations

import time
import uuid

import pytest
import redis.asyncio as aioredis

from tars_agent.limiter import Budget, SharedLimiter
from tars_agent.settings import load_settings
from tars_contract import contract

from .conftest import RedisServer

BOUNDS = [
    ("requests_per_minute", contract.ENV_REQUESTS_PER_MINUTE, contract.MAX_REQUESTS_PER_MINUTE),
    ("requests_per_hour", contract.ENV_REQUESTS_PER_HOUR, contract.MAX_REQUESTS_PER_HOUR),
    ("tokens_per_minute", contract.ENV_TOKENS_PER_MINUTE, contract.MAX_TOKENS_PER_MINUTE),
]
EDGES = [(field, env, value) for field, env, top in BOUNDS for value in (contract.MIN_RATE_LIMIT, top)]


@pytest.mark.parametrize(("field", "env", "value"), EDGES)
async def test_the_agent_starts_and_admits_at_every_accepted_limit(
    field: str, env: str, value: int, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Once, requestsPerMinute: 1 crash-looped every agent and 150M tokens/minute raised a traceback.
    monkeypatch.setenv(contract.ENV_REDIS_URL, redis_server.url)
    monkeypatch.setenv(contract.ENV_BUDGET, "b")
    monkeypatch.setenv(env, str(value))
    settings = load_settings()
    assert getattr(settings, field) == value
    budget = Budget.from_rates(f"edge-{uuid.uuid4().hex}", **{field: value})
    client = aioredis.from_url(redis_server.url)
    try:
        limiter = SharedLimiter(client, budget)
        decision = await limiter.try_acquire("critical", 1)
        assert decision.admitted
    finally:
        await client.aclose()


async def test_a_top_tier_token_budget_admits_no_more_than_its_limit(redis_server: RedisServer) -> None:
    tpm = 150_000_000
    budget = Budget.from_rates(f"top-{uuid.uuid4().hex}", tokens_per_minute=tpm)
    client = aioredis.from_url(redis_server.url)
    try:
        limiter = SharedLimiter(client, budget, reserve_fraction=0.0)
        admitted = 0
        started = time.monotonic()
        while (await limiter.try_acquire("critical", 100_000)).admitted:
            admitted += 1
        # A fresh bucket's half burst (2.5 % of the budget) plus what refilled meanwhile
        # (2.4M tokens/s), no more, and not much less: the rounding to blocks is small.
        refilled = 0.95 * tpm / 60 * (time.monotonic() - started)
        assert 0.024 * tpm <= admitted * 100_000 <= 0.025 * tpm + refilled + 100_000
    finally:
        await client.aclose()
