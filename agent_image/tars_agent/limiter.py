"""The shared limiter client: pool-wide budgets in Redis, waited for with a deadline.

Decisions run in one Lua script on the Redis server clock (limiter_lua), with
the bucket math of gcra.py. Callers wait for the exact retry-after the script
returns instead of failing. When Redis is unreachable the limiter degrades per
priority (see DEGRADED_LOCAL and README.md) and goes back to Redis by itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tars_agent import gcra, limiter_lua
from tars_agent.gcra import LimitParams
from tars_agent.metrics import AgentMetrics
from tars_agent.tasks import PRIORITIES

log = logging.getLogger(__name__)

# Priorities that may use the local fallback bucket while Redis is down (fail-open within a
# local share of the budget); the others wait for Redis until their deadline (fail-closed).
DEGRADED_LOCAL = frozenset({"critical", "high"})

_REDIS_DOWN_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
# Waiters that wake at the same instant would race for the same refill; a little jitter spreads
# them. Added after the exact retry-after, never subtracted from it.
_WAKE_JITTER_S = 0.002


class LimiterTimeout(Exception):
    """The deadline passed before the budget had room."""

    def __init__(self, priority: str, waited_s: float, retry_after_s: float) -> None:
        super().__init__(
            f"rate limit budget had no room for a {priority} request within {waited_s:.3f}s "
            f"(next slot in {retry_after_s:.3f}s)"
        )
        self.retry_after_s = retry_after_s


class RequestTooLarge(Exception):
    """The request costs more than a full bucket holds: waiting would never help."""


@dataclass(frozen=True)
class Budget:
    name: str
    limits: tuple[LimitParams, ...]

    def __post_init__(self) -> None:
        if not self.limits:
            raise ValueError(f"budget {self.name!r} has no limits")

    @staticmethod
    def from_rates(
        name: str,
        *,
        requests_per_minute: int | None = None,
        requests_per_hour: int | None = None,
        tokens_per_minute: int | None = None,
        burst_fraction: float = 0.05,
    ) -> Budget:
        """Limits per minute/hour; burst is a fraction of each limit (the rest refills evenly)."""
        limits = []
        for lname, limit, window_s in (("rpm", requests_per_minute, 60), ("rph", requests_per_hour, 3600)):
            if limit:
                burst = min(max(math.floor(limit * burst_fraction), 1), limit - 1)
                limits.append(LimitParams(lname, limit, window_s * 1_000_000, burst))
        if tokens_per_minute:
            limits.append(LimitParams.scaled("tpm", tokens_per_minute, 60_000_000, burst_fraction))
        return Budget(name, tuple(limits))


def budget_keys(name: str) -> tuple[str, str]:
    """(pause key, overrides key); the {hash tag} keeps a budget's keys in one cluster slot."""
    return f"tars:budget:{{{name}}}:pause", f"tars:budget:{{{name}}}:overrides"


def tat_key(budget: str, limit: str) -> str:
    return f"tars:budget:{{{budget}}}:tat:{limit}"


@dataclass
class Reservation:
    priority: str
    tokens: int  # tokens reserved up front
    server_now_us: int  # decision time on the Redis clock (0 for local decisions)
    local: bool = False  # decided by the degraded-mode local bucket


@dataclass
class _LocalBuckets:
    """The degraded-mode bucket: this process's share of the budget, on the local clock."""

    limits: tuple[LimitParams, ...]
    tats: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.tats = tuple(0 for _ in self.limits)


def local_share(budget: Budget, expected_pool_size: int) -> tuple[LimitParams, ...]:
    """Each process gets limit/pool_size, so the pool as a whole stays within the budget."""
    n = max(expected_pool_size, 1)
    out = []
    for p in budget.limits:
        limit = max(p.limit // n, 2)
        burst = min(max(p.burst // n, 1), limit - 1)
        out.append(LimitParams(p.name, limit, p.window_us, burst, p.unit, p.unit_size))
    return tuple(out)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_reset(value: str) -> float | None:
    """OpenAI's reset durations like '6m0s', '1.5s', '20ms' in seconds; None if unparsable."""
    value = value.strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != pos:
            return None
        number, unit = float(match.group(1)), match.group(2)
        total += number * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        pos = match.end()
    return total if pos == len(value) else None


def _raise_if_cancelled() -> None:
    """On a busy loop redis-py can surface a cancellation as its own TimeoutError: that is not
    a Redis outage, and waiting on would keep a cancelled (e.g. drained) task alive."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class SharedLimiter:
    def __init__(
        self,
        redis: aioredis.Redis,
        budget: Budget,
        *,
        reserve_fraction: float = 0.1,
        expected_pool_size: int = 1,
        metrics: AgentMetrics | None = None,
        redis_retry_interval_s: float = 1.0,
        override_ttl_s: int = 600,
        refund_unused_tokens: bool = False,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= reserve_fraction < 1:
            raise ValueError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
        self._redis = redis
        self.budget = budget
        self._reserve = reserve_fraction
        self._metrics = metrics
        self._retry_interval = redis_retry_interval_s
        self._override_ttl = override_ttl_s
        # OpenAI charges max_tokens against its token limit up front and gives nothing back when a
        # response uses less; refunding it let the pool overrun the upstream's limit (46 % 429s in
        # `bench/limiter_bench.py --tokens`). True only for an upstream that counts actual usage.
        self._refund_unused = refund_unused_tokens
        self._sleep = sleep
        self._monotonic = monotonic
        self._pause_key, self._overrides_key = budget_keys(budget.name)
        self._tat_keys = [tat_key(budget.name, p.name) for p in budget.limits]
        self._acquire = redis.register_script(limiter_lua.ACQUIRE)
        self._reconcile = redis.register_script(limiter_lua.RECONCILE)
        self._pause = redis.register_script(limiter_lua.PAUSE)
        self._local = _LocalBuckets(local_share(budget, expected_pool_size))
        self._redis_down_until = 0.0  # monotonic time before which Redis is not tried again

    @property
    def degraded(self) -> bool:
        return self._monotonic() < self._redis_down_until

    def _costs(self, tokens: int) -> tuple[int, ...]:
        return tuple(p.units(tokens) if p.unit == "tokens" else 1 for p in self.budget.limits)

    def _mark_redis_down(self, exc: BaseException) -> None:
        if not self.degraded:
            log.warning(
                "limiter: Redis unreachable (%s); degraded mode for %.1fs",
                type(exc).__name__,
                self._retry_interval,
            )
        self._redis_down_until = self._monotonic() + self._retry_interval
        if self._metrics:
            self._metrics.limiter_degraded.set(1)

    async def try_acquire(self, priority: str, tokens: int) -> tuple[gcra.Decision, int]:
        """One decision in Redis: (decision, server time in us). Raises Redis errors."""
        args: list[str | int | float] = [priority, repr(self._reserve), len(self.budget.limits)]
        for p, cost in zip(self.budget.limits, self._costs(tokens), strict=True):
            args += [p.name, p.limit, p.window_us, p.burst, cost]
        reply = await self._acquire(keys=[self._pause_key, self._overrides_key, *self._tat_keys], args=args)
        admitted, wait, now, denied_by, too_large = (int(x) for x in reply[:5])
        tats = tuple(int(x) for x in reply[5:])
        if self._metrics and admitted:
            for p, tat in zip(self.budget.limits, tats, strict=True):
                capacity = gcra.tolerance_us(p.limit, p.burst, p.window_us, 0.0, True)
                self._metrics.budget_utilization.labels(self.budget.name, p.name).set(
                    min(max((tat - now) / capacity, 0.0), 1.0)
                )
        return gcra.Decision(bool(admitted), wait, tats, denied_by, bool(too_large)), now

    def _try_local(self, priority: str, tokens: int) -> gcra.Decision:
        now_us = int(self._monotonic() * 1_000_000)
        decision = gcra.decide(
            self._local.tats,
            now_us,
            self._costs(tokens),
            self._local.limits,
            tuple(None for _ in self._local.limits),
            priority,
            self._reserve,
        )
        if decision.admitted:
            self._local.tats = decision.tats
        return decision

    async def acquire(self, priority: str, tokens: int, timeout_s: float) -> Reservation:
        """Wait until the budget admits one request of `tokens` tokens, or raise LimiterTimeout."""
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}; expected one of {', '.join(PRIORITIES)}")
        start = self._monotonic()
        deadline = start + timeout_s
        while True:
            decision: gcra.Decision | None = None
            server_now = 0
            local = False
            if not self.degraded:
                try:
                    decision, server_now = await self.try_acquire(priority, tokens)
                    if self._metrics:
                        self._metrics.limiter_degraded.set(0)
                except _REDIS_DOWN_ERRORS as exc:
                    _raise_if_cancelled()
                    self._mark_redis_down(exc)
            if decision is None and priority in DEGRADED_LOCAL:
                decision, local = self._try_local(priority, tokens), True
            if decision is not None and decision.too_large:
                raise RequestTooLarge(
                    f"a request of {tokens} tokens is larger than budget {self.budget.name!r} can ever admit "
                    f"at priority {priority}; lower max_tokens or raise the budget's burst"
                )
            if decision is not None and decision.admitted:
                if self._metrics:
                    self._metrics.limiter_admitted.labels(priority).inc()
                    self._metrics.limiter_wait.labels(priority).observe(self._monotonic() - start)
                return Reservation(priority, tokens, server_now, local)
            if decision is not None:
                wait_s = decision.retry_after_us / 1_000_000
                if self._metrics:
                    self._metrics.limiter_denied.labels(priority).inc()
            else:  # fail-closed while Redis is down: wait for the next Redis probe
                wait_s = max(self._redis_down_until - self._monotonic(), 0.0)
            remaining = deadline - self._monotonic()
            if wait_s > remaining:
                if self._metrics:
                    self._metrics.limiter_timeouts.labels(priority).inc()
                raise LimiterTimeout(priority, self._monotonic() - start, wait_s)
            await self._sleep(wait_s + random.uniform(0, _WAKE_JITTER_S))

    async def reconcile(self, reservation: Reservation, actual_tokens: int) -> None:
        """Correct the token reservation with the real usage: charge what was used beyond it;
        refund what was not used only when `refund_unused_tokens` (see __init__)."""
        delta = actual_tokens - reservation.tokens
        if self._metrics:
            self._metrics.estimation_error.observe(delta)
        if delta < 0 and not self._refund_unused:
            return
        await self._correct(reservation, delta)

    async def release(self, reservation: Reservation) -> None:
        """Give back a whole reservation: the upstream refused the request and charged no tokens."""
        await self._correct(reservation, -reservation.tokens)

    async def _correct(self, reservation: Reservation, delta: int) -> None:
        if delta == 0 or reservation.local:
            return
        for p, key in zip(self.budget.limits, self._tat_keys, strict=True):
            if p.unit != "tokens":
                continue
            # Charges round up, refunds down: the budget stays on the safe side of the blocks.
            units = p.units(delta) if delta > 0 else -(-delta // p.unit_size)
            try:
                await self._reconcile(
                    keys=[self._overrides_key, key], args=[p.name, p.limit, p.window_us, p.burst, units]
                )
            except _REDIS_DOWN_ERRORS as exc:
                self._mark_redis_down(exc)

    async def pause(self, seconds: float) -> None:
        """Pause the whole budget (every process of every pool sharing it), e.g. on an upstream 429."""
        if self._metrics:
            self._metrics.upstream_429.labels(self.budget.name).inc()
        pause_us = math.ceil(seconds * 1_000_000)
        try:
            await self._pause(keys=[self._pause_key], args=[pause_us])
        except _REDIS_DOWN_ERRORS as exc:
            self._mark_redis_down(exc)

    async def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Learn from the upstream's x-ratelimit-* headers.

        A provider limit below the configured one tightens the budget (stored in Redis for every
        agent, expiring so a raised provider limit is picked up again); remaining == 0 pauses the
        budget until the provider's reset.
        """
        limit_names = {p.name for p in self.budget.limits}
        pause_s = 0.0
        overrides: dict[str, int] = {}
        for kind, lname in (("requests", "rpm"), ("tokens", "tpm")):
            limit_raw = headers.get(f"x-ratelimit-limit-{kind}")
            if limit_raw and limit_raw.isdigit() and lname in limit_names:
                params = next(p for p in self.budget.limits if p.name == lname)
                if int(limit_raw) < params.limit * params.unit_size:
                    overrides[lname] = int(limit_raw) // params.unit_size  # in the limit's units
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}", ""))
            if remaining == "0" and reset:
                pause_s = max(pause_s, reset)
        try:
            if overrides:
                async with self._redis.pipeline(transaction=True) as pipe:
                    for lname, limit in overrides.items():
                        pipe.hset(self._overrides_key, lname, limit)
                    pipe.expire(self._overrides_key, self._override_ttl)
                    await pipe.execute()
            if pause_s > 0:
                await self._pause(keys=[self._pause_key], args=[math.ceil(pause_s * 1_000_000)])
        except _REDIS_DOWN_ERRORS as exc:
            self._mark_redis_down(exc)
