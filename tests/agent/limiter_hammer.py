"""Run by test_limiter.py as a separate OS process: hammer one budget, log every admission.

argv: redis_url budget_name duration_s out_path seed
Each line of out_path is JSON [server_time_us, tokens, priority] of one admission.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis

from tars_agent.limiter import LimiterTimeout, SharedLimiter

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from limiter_budget import hammer_budget


async def worker(limiter: SharedLimiter, until: float, rng: random.Random, log: list[list[object]]) -> None:
    while time.monotonic() < until:
        priority = rng.choice(["critical", "high", "normal", "low"])
        tokens = rng.randint(1, 40)
        try:
            r = await limiter.acquire(priority, tokens, timeout_s=max(until - time.monotonic(), 0.0))
        except LimiterTimeout:
            return
        log.append([r.slot_us, tokens, priority])


async def hammer(url: str, budget_name: str, duration: str, seed: str) -> list[list[object]]:
    redis = aioredis.Redis.from_url(url, socket_timeout=2)
    limiter = SharedLimiter(redis, hammer_budget(budget_name), reserve_fraction=0.2)
    rng = random.Random(int(seed))
    log: list[list[object]] = []
    until = time.monotonic() + float(duration)
    await asyncio.gather(*(worker(limiter, until, rng, log) for _ in range(4)))
    await redis.aclose()
    return log


url, budget_name, duration, out_path, seed = sys.argv[1:6]
admissions = asyncio.run(hammer(url, budget_name, duration, seed))
Path(out_path).write_text("".join(json.dumps(line) + "\n" for line in admissions))
