"""A deleted pool's Redis keys go with it: the operator removes what its agents and submitters
wrote (waiting tasks included, which no TTL ever drops), and nothing of any other pool."""

from __future__ import annotations

import uuid

import redis.asyncio as aioredis

from tars_agent.client import TaskClient
from tars_operator.pool_keys import forget_pool_keys

from .conftest import RedisServer


async def test_the_operator_removes_a_deleted_pools_keys_and_only_those(redis_server: RedisServer) -> None:
    redis = aioredis.from_url(redis_server.url)
    namespace = f"ns-{uuid.uuid4().hex[:6]}"
    try:
        gone, kept, similar = (TaskClient(redis, namespace, p) for p in ("pool", "other", "pool-2"))
        for client in (gone, kept, similar):
            await client.submit_payload({"messages": [{"role": "user", "content": "q"}]}, "high")
        removed = await forget_pool_keys(redis, namespace, "pool")
        assert removed > 0
        assert [k async for k in redis.scan_iter(match=f"tars:{{{namespace}/pool}}:*")] == []
        for client in (kept, similar):
            assert (await client.waiting())["high"] == 1
    finally:
        await redis.aclose()
