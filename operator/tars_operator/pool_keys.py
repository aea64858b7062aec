"""A deleted pool's Redis keys, removed by the operator.

Every key of a pool expires a week after its last activity (agent_image/tars_agent/queue.py),
except the queue streams that still hold tasks: no TTL drops waiting work, and nobody would
ever take it once the pool is gone. So when a pool that used the operator's default Redis is
deleted, the operator removes all its keys (SCAN by the pool's prefix, UNLINK in batches).
Pools with their own Redis (`spec.redis`) keep the TTLs alone: their password is in a Secret
the operator may not read.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from tars_contract.contract import pool_key_prefix

BATCH = 500


async def forget_pool_keys(redis: aioredis.Redis, namespace: str, pool: str) -> int:
    """Remove every key of the pool; how many there were."""
    removed = 0
    batch: list[bytes] = []
    # The prefix is a DNS name in a hash tag: no glob metacharacters to escape.
    async for key in redis.scan_iter(match=f"{pool_key_prefix(namespace, pool)}:*", count=BATCH):
        batch.append(key)
        if len(batch) == BATCH:
            removed += await redis.unlink(*batch)
            batch.clear()
    if batch:
        removed += await redis.unlink(*batch)
    return removed
