"""The shared limiter client: pool-wide budgets in Redis, reserved with a deadline.

Every acquire reserves its start time (slot) in one Lua script on the Redis
server clock (limiter_lua.BATCH, the math of gcra.py) and sleeps once until it.
The requests of one process that arrive while a script call is in flight go
together in the next call (one EVALSHA for the batch). While the budget is
ample, a busy process holds a lease instead: admissions charged in the shared
buckets up front and spent without a script call (gcra.lease). When Redis is really
unavailable the limiter degrades per priority to a local share of the budget
(see DEGRADED_LOCAL and README.md), charges what it admitted back when Redis
returns, and goes back to Redis by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tars_agent import gcra, limiter_lua
from tars_agent.aio import cancel_and_wait
from tars_agent.gcra import LimitParams
from tars_agent.metrics import AgentMetrics
from tars_agent.tasks import PRIORITIES

log = logging.getLogger(__name__)

# Priorities that may use the local fallback bucket while Redis is down (fail-open within a
# local share of the budget); the others wait for Redis until their deadline (fail-closed).
DEGRADED_LOCAL = frozenset({"critical", "high"})

# Refused or reset connections: Redis is unavailable at once. A timeout alone may be a slow
# reply on a busy machine: only this many in a row count as unavailable.
_UNREACHABLE_ERRORS = (RedisConnectionError, OSError)
_TIMEOUTS_BEFORE_DEGRADED = 3
# Agents of a budget announce themselves in its sorted set this often; an agent not heard of
# for AGENT_TTL is no longer counted in the local share. Every PRUNE_EVERY-th heartbeat of an
# agent also drops those from the set (the count skips them anyway) and keeps the set alive.
HEARTBEAT_INTERVAL_S = 5.0
AGENT_TTL_S = 15.0
PRUNE_EVERY = 6
_AGENT_TTL_US = int(AGENT_TTL_S * 1_000_000)
# A reservation that will be refused for its class's horizon and take a ticket behind the last
# one this process took (see _ride_along_s) waits this long at most for the process's next script
# call and goes with it, instead of a call of its own.
RIDE_ALONG_S = 1.0
# A lease's life (gcra.lease): its admissions are spent within it, on this process's clock from
# before the script call that granted it. Short: it is what a pause may find unspent.
LEASE_S = 0.2
# One lease holds at most this share of each bucket's burst, and at least this many admissions
# when asked for: smaller leases lost 8-10 % of what they held at 10-20 acquires a second (the
# demand is a few a lease life, and every dip ends one unspent), where a script call costs little.
LEASE_BURST_SHARE = 1 / 8
LEASE_ASK_MIN = 4
# a batch's order: higher classes first
_RANK: dict[str, int] = {p: rank for rank, p in enumerate(PRIORITIES, start=1)}


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


class _RedisUnavailable(Exception):
    """The batch did not reach Redis (the limiter is in degraded mode)."""


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
        burst_fraction: float | None = None,
    ) -> Budget:
        """Limits per minute/hour; burst is a fraction of each limit (the rest refills evenly):
        `burst_fraction`, or by default gcra.REQUEST_BURST_FRACTION / TOKEN_BURST_FRACTION."""
        limits = []
        requests_fraction = burst_fraction or gcra.REQUEST_BURST_FRACTION
        for lname, limit, window_s in (("rpm", requests_per_minute, 60), ("rph", requests_per_hour, 3600)):
            if limit:
                burst = min(max(math.floor(limit * requests_fraction), 1), limit - 1)
                limits.append(LimitParams(lname, limit, window_s * 1_000_000, burst))
        if tokens_per_minute:
            tokens_fraction = burst_fraction or gcra.TOKEN_BURST_FRACTION
            limits.append(LimitParams.scaled("tpm", tokens_per_minute, 60_000_000, tokens_fraction))
        return Budget(name, tuple(limits))


def state_key(name: str) -> str:
    """String: the budget's buckets, pause, ticket queues and learned limits (gcra.State); the
    {hash tag} keeps a budget's keys in one cluster slot."""
    return f"tars:budget:{{{name}}}:state"


def agents_key(name: str) -> str:
    """Sorted set agent -> last heard of (server us): the live agents of the budget."""
    return f"tars:budget:{{{name}}}:agents"


def pause_channel(name: str) -> str:
    """Pub/sub channel: the pause end (server us) each time a 429 pauses the budget longer."""
    return f"tars:budget:{{{name}}}:paused"


@dataclass
class Reservation:
    priority: str
    tokens: int  # tokens reserved up front
    server_now_us: int  # decision time on the Redis clock (0 for local decisions)
    local: bool = False  # decided by the degraded-mode local bucket
    slot_us: int = 0  # the reserved start on the Redis clock (local decisions: the local clock)
    reserved_tats: tuple[int, ...] = ()  # the buckets this reservation left (to give it back)
    costs: tuple[int, ...] = ()
    leased: bool = False  # spent from a lease: slot_us is the estimated Redis time of the admission


@dataclass
class LeaseStats:
    """What this process's leases held and what became of it, in admissions."""

    leases: int = 0
    granted: int = 0
    spent: int = 0
    lost: int = 0  # unspent at expiry, or voided (a pause, the subscription lost): charged, unused


@dataclass(slots=True)
class _Lease:
    until: float  # monotonic: spent before then (from before the call that granted it)
    left: list[int]  # units per limit
    granted: int  # admissions
    costs: tuple[int, ...]  # of each admission granted
    spent: int = 0


@dataclass(frozen=True)
class TryResult:
    """try_acquire's answer: admitted now, or the exact wait for a slot."""

    admitted: bool
    retry_after_us: int
    too_large: bool = False


@dataclass
class _LocalBuckets:
    """The degraded-mode buckets: this process's share of the budget, on the local clock."""

    limits: gcra.Limits
    tats: tuple[int, ...]
    owed: list[int]  # units admitted locally, charged to the shared buckets when Redis returns


class _Answer(NamedTuple):
    """An op's answer in its batch's reply (gcra.OpResult's fields; a tuple is cheaper to build)."""

    status: int
    value: int
    limiting: int
    tats: tuple[int, ...]


@dataclass(slots=True)
class _Request:
    op: gcra.Op
    future: asyncio.Future[tuple[_Answer, int, float]] | None  # None: nobody waits
    abandoned: bool = False  # the caller left (deadline, cancel): give an admission back
    order: tuple[int, int] = (0, 0)  # reservations: (priority rank, arrival); others go first
    deadline: float = math.inf  # monotonic: the caller stops waiting for the answer then


class _BatchScript:
    """EVALSHA of one script on a connection of its own from `redis`'s pool, packed here.

    The batch is this process's only frequent Redis call and its args are plain str and int:
    redis-py's generic path (per-argument encoders, the pool's lock and observability hooks per
    command) cost several times the script's own server time. Errors, reconnects and retries stay
    redis-py's (the connection's send_packed_command, read_response, connect and Retry); its
    socket_timeout bounds the handshake of a reconnect, and send and read together (see _send).
    One call at a time (the limiter's flusher)."""

    def __init__(
        self, redis: aioredis.Redis, script: str, keys: Sequence[str], head: Sequence[str | int | float]
    ) -> None:
        self._redis = redis
        sha = hashlib.sha1(script.encode()).hexdigest()
        # the keys and the args that never change (`head`) are packed once. The first call, and the
        # one after a NOSCRIPT (Redis lost its scripts), sends the script itself (EVAL caches it):
        # a fresh process's first call is one command, where EVALSHA, its NOSCRIPT, SCRIPT LOAD (on
        # a connection of its own: a HELLO more) and EVALSHA again were four
        self._head = _resp(("EVALSHA", sha, len(keys), *keys, *head))
        self._eval_head = _resp(("EVAL", script, len(keys), *keys, *head))
        self._loaded = False
        self._head_parts = 3 + len(keys) + len(head)
        self._conn: AbstractConnection | None = None
        self._timeout: float | None = None  # the connection's socket_timeout, for the whole call

    async def __call__(self, count: int, args: bytes) -> Any:
        """EVALSHA (EVAL until the script is known to be loaded) with the keys and head args, then
        `count` more args packed by _resp."""
        parts = self._head_parts + count
        packed = b"*%d\r\n%s%s" % (parts, self._head if self._loaded else self._eval_head, args)
        conn = self._conn
        if conn is None:
            conn = self._conn = await self._redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
            # one timeout around send and read (see _send) instead of redis-py's own for each:
            # its send timeout runs the write in a task of its own, every call; a send only
            # fills the socket's buffer, so the read has about the whole timeout, as before
            self._timeout, conn.socket_timeout = conn.socket_timeout, None

        async def failed(error: Exception) -> None:  # as redis-py's execute_command
            await conn.disconnect(error=error)

        try:
            reply = await conn.retry.call_with_retry(lambda: self._send(conn, packed), failed)
        except NoScriptError:  # a Redis restarted or flushed
            packed = b"*%d\r\n%s%s" % (parts, self._eval_head, args)
            reply = await conn.retry.call_with_retry(lambda: self._send(conn, packed), failed)
        self._loaded = True
        return reply

    async def _send(self, conn: AbstractConnection, packed: bytes) -> Any:
        try:
            if not conn.is_connected:  # a reconnect's handshake gets a timeout of its own, as before
                async with asyncio.timeout(self._timeout):
                    await conn.connect()  # type: ignore[no-untyped-call]
            async with asyncio.timeout(self._timeout):
                await conn.send_packed_command(packed)
                return await conn.read_response()
        except TimeoutError:
            # redis-py closed the connection when the timeout interrupted it; as its own timeouts
            raise RedisTimeoutError("Timeout reading from socket") from None

    async def release(self) -> None:
        """Give the connection back to the pool (the limiter is done with it)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.socket_timeout = self._timeout
            await self._redis.connection_pool.release(conn)


def _resp(parts: Sequence[str | int | float]) -> bytes:
    """Command arguments as RESP bulk strings, as redis-py's packer writes them (numbers as their
    str); the array header is the caller's."""
    fields = []
    for part in parts:  # a plain loop: faster here than a comprehension over map(str, ...)
        s = str(part)
        fields.append(f"${len(s)}\r\n{s}\r\n")
    text = "".join(fields)
    if text.isascii():  # lengths in characters are lengths in bytes
        return text.encode()
    encoded = [str(p).encode() for p in parts]
    return b"".join(b"$%d\r\n%s\r\n" % (len(e), e) for e in encoded)


def local_share(budget: Budget, expected_pool_size: int) -> tuple[LimitParams, ...]:
    """Each process gets limit/pool_size, so the pool as a whole stays within the budget."""
    n = max(expected_pool_size, 1)
    out = []
    for p in budget.limits:
        limit = max(p.limit // n, 2)
        burst = min(max(p.burst // n, 1), limit - 1)
        out.append(LimitParams(p.name, limit, p.window_us, burst, p.unit, p.unit_size))
    return tuple(out)


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
        metrics: AgentMetrics | None = None,
        redis_retry_interval_s: float = 1.0,
        override_ttl_s: int = 600,
        refund_unused_tokens: bool = False,
        lease_s: float = LEASE_S,
        agent_id: str | None = None,
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
        self._state_key = state_key(budget.name)
        self._channel = pause_channel(budget.name)
        keys = [self._state_key, agents_key(budget.name)]
        # leases need a subscription to the pause channel (a pause voids them at once), so a
        # process asks for one only while pushes reach it (see _ask_lease); 0: no leases
        self._lease_s = lease_s
        self._lease_us = int(lease_s * 1_000_000)
        self._leases: list[_Lease] = []  # oldest first
        self._lease_asked = False  # a Lease op queued or in flight: one at a time
        self._held = 0  # admissions left in the live leases
        self._voids = 0  # leases voided so far (see _void_leases): a grant older than a void is void
        self._demand = 0.0  # acquires in about the last lease life (decayed with that time constant)
        self._demand_at = 0.0
        self.lease_stats = LeaseStats()
        head: list[str | int | float] = [repr(reserve_fraction), self._lease_us, len(budget.limits)]
        for p in budget.limits:
            head += [p.name, p.limit, p.window_us, p.burst]
        self._batch_script = _BatchScript(redis, limiter_lua.BATCH, keys, head)
        # a reservation's packed args but its deadline, by (returning, priority, max_ahead, costs)
        self._packed: dict[tuple[bool, str, int, tuple[int, ...]], bytes] = {}
        self._zeros = _resp([0] * (len(budget.limits) - 1))  # a reservation's unused fields
        self._reconcile = redis.register_script(limiter_lua.RECONCILE)
        self._agent_id = agent_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._next_heartbeat = 0.0  # monotonic
        self._heartbeats = 0
        self.agents: int | None = None  # live agents of the budget at the last contact
        self._pending: list[_Request] = []
        self._in_flight: list[_Request] = []  # the batch whose script call is under way
        # One timer for the deadlines of all waiting callers, at the nearest (a timer per call
        # cost more than the rest of an uncontended acquire)
        self._watch: asyncio.TimerHandle | None = None
        self._watch_at = math.inf
        self._watch_loop: asyncio.AbstractEventLoop | None = None  # a limiter may outlive a loop
        self._unit_costs = (
            tuple(1 for _ in budget.limits) if all(p.unit != "tokens" for p in budget.limits) else None
        )
        self._parked: list[_Request] = []  # ops waiting for another op of this process (RIDE_ALONG_S)
        # the buckets after the last script call: (tats, server now us, monotonic when received)
        self._seen: tuple[tuple[int, ...], int, float] = ((), 0, 0.0)
        self._tails: dict[str, int] = {}  # class -> the slot of the last ticket this process took
        self._arrivals = 0  # acquires so far: their order within a batch
        self._flusher: asyncio.Task[None] | None = None
        self._timeouts = 0  # consecutive Redis timeouts
        self._redis_down_until = 0.0  # monotonic time before which Redis is not tried again
        self._local: _LocalBuckets | None = None
        self._local_pause_until = 0.0  # monotonic
        self._written_overrides: dict[str, tuple[int, float]] = {}  # limit -> (value, monotonic)
        # The pause end (server us) last heard of, in a reply or pushed on the pause channel; the
        # subscription that pushes it (its generation while subscribed, None while not); and the
        # generation that was live before a script call whose reply came: from that call on, the
        # pushes tell every pause.
        self._pause_until_us = 0
        self._listener: asyncio.Task[None] | None = None
        self._generation = 0
        self._subscribed: int | None = None
        self._covered = 0
        # the last shared state seen: (used, server now us, monotonic when received) per limit
        self._used: list[tuple[float, int, float]] = [(0.0, 0, 0.0) for _ in budget.limits]
        if metrics:
            for i, p in enumerate(budget.limits):
                metrics.budget_utilization.labels(budget.name, p.name).set_function(self._utilization_of(i))

    @property
    def degraded(self) -> bool:
        return self._monotonic() < self._redis_down_until

    def utilization(self, i: int) -> float:
        """Limit i's units admitted over about the last window / what it sustains (gcra.utilization),
        aged to now from the last reply: it falls while this process does not ask Redis."""
        used, server_now, received = self._used[i]
        if not server_now:
            return 0.0
        now = server_now + int((self._monotonic() - received) * 1_000_000)
        limits = gcra.Limits(self.budget.limits, tuple(None for _ in self.budget.limits), self._reserve)
        return gcra.utilization(gcra.decay(used, server_now, now, self.budget.limits[i].window_us), limits, i)

    def _utilization_of(self, i: int) -> Callable[[], float]:
        return lambda: self.utilization(i)

    def _costs(self, tokens: int) -> tuple[int, ...]:
        if self._unit_costs is not None:
            return self._unit_costs
        return tuple(p.units(tokens) if p.unit == "tokens" else 1 for p in self.budget.limits)

    # -- the batch: every op of this process that arrived since the last call, in one EVALSHA ----

    def _submit(
        self,
        op: gcra.Op,
        wait: bool,
        order: tuple[int, int] = (0, 0),
        deadline: float = math.inf,
        park_s: float = 0.0,
    ) -> _Request:
        """Queue `op` for the next script call; parked (`park_s`), it waits for another op of this
        process to go with, at most that long."""
        future = asyncio.get_running_loop().create_future() if wait else None
        request = _Request(op, future, order=order, deadline=deadline)
        if park_s > 0:
            self._parked.append(request)
            asyncio.get_running_loop().call_later(park_s, self._unpark, request)
            return request
        self._pending.append(request)
        if self._parked:
            self._pending += self._parked
            self._parked.clear()
        self._start_flusher()
        return request

    def _unpark(self, request: _Request | None = None) -> None:
        """A parked op's time is up (None: all of them): it goes, and every other parked op with it."""
        if self._parked and (request is None or request in self._parked):
            self._pending += self._parked
            self._parked.clear()
            self._start_flusher()

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        if self._in_flight:
            # the last flusher ended in its script call (cancelled): its callers still wait, and
            # their ops go again, as after a timeout (a reservation may be charged twice)
            self._forget_lease_ask(self._in_flight)
            self._pending = [r for r in self._in_flight if r.future is not None] + self._pending
            self._in_flight = []
        while self._pending:
            if self.degraded:
                self._fail_pending()
                return
            batch, self._pending = self._pending, []
            # a caller that left before its op was sent: nothing to reserve, its slot to give back
            batch = [
                _Request(gcra.GiveBack(r.op.reserved, r.op.costs), None)
                if r.abandoned and isinstance(r.op, gcra.Confirm)
                else r
                for r in batch
                if not (r.abandoned and isinstance(r.op, gcra.Reserve))
            ]
            if not batch:
                continue
            # higher classes first, then first come first served: callers that retry together
            # (refused for their horizon) keep the order in which they first asked
            batch.sort(key=lambda r: r.order)
            if self._local is not None and any(self._local.owed):
                # back from an outage: what was admitted locally is charged to the shared buckets
                batch.insert(0, _Request(gcra.Charge(tuple(self._local.owed)), None))
                self._local.owed = [0 for _ in self.budget.limits]
            # the deadline timer sees these callers; left set if this flusher ends in the call
            self._in_flight = batch
            live = self._subscribed  # subscribed before the call was sent: before the batch ran
            sent = self._monotonic()  # before the batch ran: a lease's life counts from here
            voids = self._voids
            try:
                reply = await self._run(batch)
            except RedisTimeoutError as exc:
                # The batch may have run and its reply been lost: sent again, a reservation may be
                # charged twice (never too little). A cancelled flusher is not an outage.
                _raise_if_cancelled()
                self._in_flight = []
                self._timeouts += 1
                self._forget_lease_ask(batch)
                self._pending = [
                    r for r in batch if r.future is not None or isinstance(r.op, gcra.Charge)
                ] + self._pending
                # during an outage (local buckets in use) one failed probe is enough
                if self._timeouts >= _TIMEOUTS_BEFORE_DEGRADED or self._local is not None:
                    self._mark_redis_down(exc)
                continue
            except _UNREACHABLE_ERRORS as exc:
                _raise_if_cancelled()
                self._in_flight = []
                self._forget_lease_ask(batch)
                self._pending = [
                    r for r in batch if r.future is not None or isinstance(r.op, gcra.Charge)
                ] + self._pending
                self._mark_redis_down(exc)
                continue
            self._in_flight = []
            self._timeouts = 0
            if live is not None:
                self._covered = live
            self._redis_down_until = 0.0
            self._local = None
            if self._metrics:
                self._metrics.limiter_degraded.set(0)
            self._dispatch(batch, reply, sent, voids)

    def _forget_lease_ask(self, dropped: list[_Request]) -> None:
        """A Lease op that will not reach Redis (the call failed): another may be asked later."""
        if any(isinstance(r.op, gcra.Lease) for r in dropped):
            self._lease_asked = False

    async def _run(self, batch: list[_Request]) -> list[str | int | bytes]:
        member, prune = "", ""
        if self._monotonic() >= self._next_heartbeat:
            member = self._agent_id
            prune = "1" if self._heartbeats % PRUNE_EVERY == PRUNE_EVERY - 1 else ""
            self._heartbeats += 1
            self._next_heartbeat = self._monotonic() + HEARTBEAT_INTERVAL_S
        n = len(self.budget.limits)
        parts = [_resp((member, _AGENT_TTL_US, prune, self._channel, len(batch)))]
        packed = self._packed
        for request in batch:
            op = request.op
            if isinstance(op, gcra.Reserve):
                # all but the deadline repeat from call to call: packed once
                key = (op.returning, op.priority, op.max_ahead_us, op.costs)
                head = packed.get(key)
                if head is None:
                    if len(packed) >= 256:  # near their deadlines callers' max_ahead_us vary
                        packed.clear()
                    head = packed[key] = _resp(_op_args(op, n)[: 4 + n])
                parts.append(head)
                parts.append(_resp((op.deadline_us,)))
                parts.append(self._zeros)
            else:
                parts.append(_resp(_op_args(op, n)))
        return list(await self._batch_script(5 + (4 + 2 * n) * len(batch), b"".join(parts)))

    def _dispatch(
        self, batch: list[_Request], reply: list[str | int | bytes], sent: float, voids: int
    ) -> None:
        """Hand every op's answer to its caller; `sent`, `voids`: when the call was sent and the
        leases voided by then (a lease it grants counts from the one, and is void after another)."""
        received = self._monotonic()
        n = len(self.budget.limits)
        now, pause_until, agents = int(reply[0]), int(reply[1]), int(reply[2])
        if pause_until > self._pause_until_us:
            self._pause_until_us = pause_until
            self._void_leases()
        if agents > 0:
            self.agents = agents
        for i in range(n):
            self._used[i] = (float(reply[3 + i]), now, received)
        self._seen = (tuple(map(int, reply[3 + n : 3 + 2 * n])), now, received)
        at = 3 + 2 * n
        width = 3 + n
        for request in batch:
            if isinstance(request.op, gcra.Lease):
                self._granted(request.op, int(reply[at]), int(reply[at + 1]), sent, voids)
            future = request.future
            if future is None:
                at += width
                continue
            status = int(reply[at])
            result = _Answer(
                status, int(reply[at + 1]), int(reply[at + 2]), tuple(map(int, reply[at + 3 : at + width]))
            )
            at += width
            if request.abandoned or future.done():
                # the caller left while its op was in flight: hand back what it was given
                if isinstance(request.op, gcra.Reserve) and status == 1:
                    self._submit(gcra.GiveBack(result.tats, request.op.costs), wait=False)
                elif isinstance(request.op, gcra.Confirm) and status == 1:
                    self._submit(gcra.GiveBack(request.op.reserved, request.op.costs), wait=False)
                continue
            future.set_result((result, now, received))

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, []
        for request in pending:
            if request.future is not None and not request.future.done():
                if request.abandoned:
                    request.future.cancel()  # nobody will read an exception
                else:
                    request.future.set_exception(_RedisUnavailable())
            elif isinstance(request.op, gcra.Charge) and self._local is not None:
                for i, units in enumerate(request.op.units):
                    self._local.owed[i] += units
            elif isinstance(request.op, gcra.Lease):
                self._lease_asked = False

    def _mark_redis_down(self, exc: BaseException) -> None:
        if not self.degraded:
            log.warning(
                "limiter: Redis unavailable (%s: %s); degraded mode, probing again every %.1fs",
                type(exc).__name__,
                exc,
                self._retry_interval,
            )
        self._redis_down_until = self._monotonic() + self._retry_interval
        self._timeouts = 0
        if self._local is None:
            share = local_share(self.budget, self.agents or 1) if self.agents else ()
            limits = gcra.Limits(share, tuple(None for _ in share), self._reserve)
            self._local = _LocalBuckets(limits, tuple(0 for _ in share), [0 for _ in self.budget.limits])
        if self._metrics:
            self._metrics.limiter_degraded.set(1)

    async def _call(
        self,
        op: gcra.Op,
        deadline: float,
        order: tuple[int, int] = (0, 0),
        park_s: float = 0.0,
    ) -> tuple[_Answer, int, float]:
        """Run `op` in the next batch (parked: see _submit); wait for its answer until `deadline`
        (asyncio.TimeoutError)."""
        request = self._submit(op, wait=True, order=order, deadline=deadline, park_s=park_s)
        future = request.future
        assert future is not None
        if deadline < self._watch_at or self._watch_loop is not asyncio.get_running_loop():
            self._watch_until(deadline)
        # The future is this caller's alone, so it is awaited directly (no wait_for, no shield, no
        # task per call): a cancel cancels it, and _dispatch gives back what a done future missed.
        try:
            return await future
        except BaseException:
            request.abandoned = True
            raise

    def _watch_until(self, deadline: float) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self._watch_at = deadline
        self._watch_loop = asyncio.get_running_loop()
        self._watch = self._watch_loop.call_later(
            max(deadline - self._monotonic(), 0.0), self._expire_waiting
        )

    def _expire_waiting(self) -> None:
        """The nearest deadline came: its callers stop waiting (their ops may still run, see
        _dispatch); the timer moves on to the next deadline of a caller still waiting."""
        self._watch, self._watch_at = None, math.inf
        now = self._monotonic()
        nearest = math.inf
        for request in (*self._pending, *self._parked, *self._in_flight):
            future = request.future
            if future is None or future.done():
                continue
            if request.deadline <= now:
                future.set_exception(TimeoutError())
            else:
                nearest = min(nearest, request.deadline)
        if nearest < math.inf:
            self._watch_until(nearest)

    async def aclose(self, timeout_s: float = 1.0) -> None:
        """Let the ops already submitted (give-backs of cancelled callers) reach Redis before its
        connection closes; at most `timeout_s`. Ends the pause subscription."""
        self._unpark()  # not after the connection closed
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(flusher), timeout_s)
        if flusher is None or flusher.done():
            await self._batch_script.release()
        if self._listener is not None:
            # a SUBSCRIBE that lost its cancel goes on to wait for messages (see cancel_and_wait)
            await cancel_and_wait([self._listener])
            self._listener = None

    # -- the pause channel: a 429 reaches the callers sleeping on a reservation without a call ---

    async def _listen(self) -> None:
        """Hold one subscription to the budget's pause channel; subscribe again after a failure."""
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._generation += 1
                        self._subscribed = self._generation
                    elif message["type"] == "message" and int(message["data"]) > self._pause_until_us:
                        self._pause_until_us = int(message["data"])
                        self._void_leases()
            except (*_UNREACHABLE_ERRORS, RedisError) as exc:
                _raise_if_cancelled()
                log.info("limiter: pause subscription lost (%s); sleeping callers confirm instead", exc)
            finally:
                self._subscribed = None
                self._void_leases()  # a pause might not reach this process now
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            await asyncio.sleep(self._retry_interval)

    # -- acquire ---------------------------------------------------------------------------------

    async def try_acquire(self, priority: str, tokens: int) -> TryResult:
        """Admit now or not at all (nothing is charged when not); the wait for a slot otherwise."""
        op = gcra.Reserve(priority, 0, self._costs(tokens))
        result, now, _ = await self._call(op, self._monotonic() + 60)
        return TryResult(
            result.status == 1, max(result.value - now, 0) if result.status == 0 else 0, result.status == 2
        )

    async def acquire(self, priority: str, tokens: int, timeout_s: float) -> Reservation:
        """Reserve a slot for one request of `tokens` tokens and sleep until it, or raise
        LimiterTimeout at once when the slot is past the deadline (nothing charged). An admission
        from a live lease returns at once, without a script call and without yielding."""
        rank = _RANK.get(priority)
        if rank is None:
            raise ValueError(f"unknown priority {priority!r}; expected one of {', '.join(PRIORITIES)}")
        costs = self._costs(tokens)
        if self._lease_us:
            leased = self._spend_lease(priority, tokens, costs)
            if leased is not None:
                return leased
        start = self._monotonic()
        deadline = start + timeout_s
        self._arrivals += 1
        order = (rank, self._arrivals)
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen())
        returning = False  # refused for its horizon before: holds a ticket
        while True:
            if (
                self._local is not None
                and self.degraded
                and priority in DEGRADED_LOCAL
                and self._local.limits.params
            ):
                return await self._acquire_local(priority, tokens, costs, start, deadline)
            remaining_us = max(int((deadline - self._monotonic()) * 1_000_000), 0)
            op = gcra.Reserve(
                priority, gcra.max_ahead_us(priority, remaining_us, returning), costs, remaining_us, returning
            )
            park_s = self._ride_along_s(op)
            if park_s > 0:
                # behind the tickets: admitted only if the bucket has room at once, it never
                # overtakes a ticket's holder who comes back late (every later one would be refused once)
                op = op._replace(max_ahead_us=0)
            try:
                result, now, received = await self._call(op, deadline, order, park_s)
            except TimeoutError:
                self._timed_out(priority, start, 0.0)
            except _RedisUnavailable:
                if priority in DEGRADED_LOCAL and self._local is not None and self._local.limits.params:
                    continue
                # fail-closed: wait for the next probe of Redis, within the deadline
                wake = max(self._redis_down_until, self._monotonic() + 0.01)
                if wake > deadline:
                    self._timed_out(priority, start, wake - self._monotonic())
                await self._sleep(wake - self._monotonic())
                continue
            if result.status == 2:
                raise RequestTooLarge(
                    f"a request of {tokens} tokens is larger than budget {self.budget.name!r} can ever admit "
                    f"at priority {priority}; lower max_tokens or raise the budget's burst"
                )
            ahead_s = (result.value - now) / 1_000_000
            if result.status == 0:
                if self._metrics:
                    self._metrics.limiter_denied.labels(priority).inc()
                if result.value - now > remaining_us:
                    self._timed_out(priority, start, ahead_s)
                # beyond its class's horizon: ask again when its ticket's slot is inside it
                if not op.returning:
                    self._tails[priority] = max(self._tails.get(priority, 0), result.value)
                returning = True
                horizon_s = (gcra.HORIZON_US[priority] or 0) / 1_000_000
                await self._sleep(ahead_s - horizon_s - (self._monotonic() - received))
                continue
            reservation = Reservation(priority, tokens, now, False, result.value, result.tats, costs)
            try:
                delay = ahead_s - (self._monotonic() - received)
                if delay > 0:  # an immediate slot goes on without a trip through the loop
                    await self._sleep(delay)
                if self._pause_until_us > result.value:
                    # paused (pushed, or seen in a reply) while it slept: its slot goes back, and
                    # it reserves again after the pause in the same script call
                    self._submit(gcra.GiveBack(result.tats, costs), wait=False)
                    continue
                if (
                    result.value - now >= gcra.CONFIRM_AFTER_US
                    and not self._pushes_pauses()
                    and not await self._confirmed(reservation, deadline)
                ):
                    continue  # no subscription told it: paused while it slept, its slot went back
            except asyncio.CancelledError:
                self._submit(gcra.GiveBack(result.tats, costs), wait=False)
                raise
            if self._metrics:
                self._metrics.limiter_admitted.labels(priority).inc()
                self._metrics.limiter_wait.labels(priority).observe(self._monotonic() - start)
            return reservation

    def _spend_lease(self, priority: str, tokens: int, costs: tuple[int, ...]) -> Reservation | None:
        """An admission from a live lease, without a script call; None: no lease holds `costs`
        (a lease is asked for then, to go with this caller's reservation, when the demand calls for
        one). Renews ahead, when what the leases hold lasts a quarter of a lease life at the
        current demand: a lease of half a life's demand is then spent about 3/4 into its life."""
        now = self._monotonic()
        self._demand = self._demand * math.exp((self._demand_at - now) / self._lease_s) + 1.0
        self._demand_at = now
        leases = self._leases
        while leases and leases[0].until <= now:
            self._lost(leases.pop(0))
        for lease in leases:
            left = lease.left
            for i, cost in enumerate(costs):  # plain loops: all() over a generator costs ~1.5 us
                if left[i] < cost:
                    break
            else:
                for i, cost in enumerate(costs):
                    left[i] -= cost
                lease.spent += 1
                self._held -= 1
                for i, cost in enumerate(lease.costs):
                    if left[i] < cost:  # spent: out of the list, which every acquire walks
                        leases.remove(lease)
                        self._lost(lease)
                        break
                break
        else:
            self._ask_lease(costs)
            return None
        if not self._lease_asked and 4 * self._held <= self._demand:
            self._ask_lease(costs)
        self.lease_stats.spent += 1
        _, seen_now, received = self._seen
        server_now = seen_now + int((now - received) * 1_000_000)
        if self._metrics:
            self._metrics.limiter_admitted.labels(priority).inc()
            self._metrics.limiter_wait.labels(priority).observe(self._monotonic() - now)
        return Reservation(priority, tokens, server_now, False, server_now, (), costs, leased=True)

    def _ask_lease(self, costs: tuple[int, ...]) -> None:
        """Ask for a lease of what the process spends in half a lease life; in the next script
        call, and never while one is asked, in degraded mode or without pushes."""
        if self._lease_asked or self.degraded or not self._pushes_pauses():
            return
        wanted = math.ceil(self._demand / 2)
        if wanted < LEASE_ASK_MIN:
            return
        cap = min(
            (
                int(p.burst * LEASE_BURST_SHARE) // c
                for p, c in zip(self.budget.limits, costs, strict=True)
                if c
            ),
            default=0,
        )
        wanted = min(wanted, cap)
        if wanted >= gcra.LEASE_MIN:
            self._lease_asked = True
            self._submit(gcra.Lease(costs, wanted), wait=False)

    def _granted(self, op: gcra.Lease, status: int, granted: int, sent: float, voids: int) -> None:
        self._lease_asked = False
        if status != 3:
            return
        self.lease_stats.leases += 1
        self.lease_stats.granted += granted
        lease = _Lease(sent + self._lease_s, [granted * c for c in op.costs], granted, op.costs)
        if self._pushes_pauses() and self._voids == voids:
            self._leases.append(lease)
            self._held += granted
        else:  # a pause pushed before this reply came, or no subscription: it might go unheard
            self.lease_stats.lost += granted

    def _lost(self, lease: _Lease) -> None:
        """A live lease ends (expired or voided): what it held is charged and never spent."""
        self._held -= lease.granted - lease.spent
        self.lease_stats.lost += max(lease.granted - lease.spent, 0)  # tokens: spends may cost less

    def _void_leases(self) -> None:
        """A pause, an empty bucket upstream or no subscription to hear of a pause: no admission
        from a lease from now on (what they held stays charged: the budget under-uses it)."""
        self._voids += 1
        for lease in self._leases:
            self._lost(lease)
        self._leases.clear()

    def _pushes_pauses(self) -> bool:
        """Subscribed, and a script call went since: every pause from now on reaches this process
        as a push (no Confirm needed, and a lease may be spent)."""
        return self._subscribed is not None and self._covered == self._subscribed

    def _ride_along_s(self, op: gcra.Reserve) -> float:
        """How long a first reservation may wait for another op of this process to go with.

        Only while the buckets seen last refuse it for its horizon and its class's queue holds a
        ticket of this process well beyond the horizon: it would take a ticket behind that one and
        sleep at least until that ticket's slot is inside its horizon, so waiting costs it nothing
        but its place among the tickets other processes take meanwhile. The buckets as they were
        at the reply, not aged to now: while the class holds tickets beyond its horizon their
        holders, in every process, come back for the room that time makes, so it stays refused
        unless the room is there at once (all a parked op may take)."""
        if op.returning or op.critical:
            return 0.0
        tats, seen_now, received = self._seen
        tail = self._tails.get(op.priority, 0)
        if not tats or tail <= seen_now:
            return 0.0  # no ticket of this process ahead: nothing to wait for (the usual case)
        now = seen_now + int((self._monotonic() - received) * 1_000_000)
        if tail - now <= op.max_ahead_us or tail - now > op.deadline_us:
            return 0.0  # before the model: these two answer 0 whatever it says
        limits = gcra.Limits(self.budget.limits, tuple(None for _ in tats), self._reserve)
        verdict = gcra.reserve(tats, seen_now, op.costs, limits, False, op.max_ahead_us, self._pause_until_us)
        if verdict.admitted or verdict.too_large or verdict.slot_us <= now:
            return 0.0
        return min((tail - now - op.max_ahead_us) / 1_000_000, RIDE_ALONG_S)

    async def _confirmed(self, reservation: Reservation, deadline: float) -> bool:
        """After a long sleep: may the caller go, or was the budget paused (an upstream 429)?"""
        try:
            result, _, _ = await self._call(
                gcra.Confirm(reservation.reserved_tats, reservation.costs), deadline + 1
            )
        except (TimeoutError, _RedisUnavailable):
            return True  # no word of a pause: the reservation stands
        return result.status == 1

    def _timed_out(self, priority: str, start: float, retry_after_s: float) -> None:
        if self._metrics:
            self._metrics.limiter_timeouts.labels(priority).inc()
        raise LimiterTimeout(priority, self._monotonic() - start, retry_after_s)

    async def _acquire_local(
        self, priority: str, tokens: int, costs: tuple[int, ...], start: float, deadline: float
    ) -> Reservation:
        """Degraded mode: reserve in this process's share of the budget, on the local clock."""
        local = self._local
        assert local is not None
        now_us = int(self._monotonic() * 1_000_000)
        pause_us = int(self._local_pause_until * 1_000_000)
        remaining_us = max(int((deadline - self._monotonic()) * 1_000_000), 0)
        verdict = gcra.reserve(
            local.tats, now_us, costs, local.limits, priority == gcra.CRITICAL, remaining_us, pause_us
        )
        if verdict.too_large:
            raise RequestTooLarge(
                f"a request of {tokens} tokens is larger than this process's share of budget "
                f"{self.budget.name!r} while Redis is unavailable"
            )
        if not verdict.admitted:
            self._timed_out(priority, start, (verdict.slot_us - now_us) / 1_000_000)
        local.tats = verdict.tats
        for i, cost in enumerate(costs):
            local.owed[i] += cost
        await self._sleep((verdict.slot_us - now_us) / 1_000_000)
        if self._metrics:
            self._metrics.limiter_admitted.labels(priority).inc()
            self._metrics.limiter_wait.labels(priority).observe(self._monotonic() - start)
        return Reservation(priority, tokens, 0, True, verdict.slot_us, verdict.tats, costs)

    # -- after the call --------------------------------------------------------------------------

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
        if delta == 0:
            return
        for i, p in enumerate(self.budget.limits):
            if p.unit != "tokens":
                continue
            # Charges round up, refunds down: the budget stays on the safe side of the blocks.
            units = p.units(delta) if delta > 0 else -(-delta // p.unit_size)
            if reservation.local:
                if delta > 0 and self._local is not None:
                    self._local.owed[i] += units
                continue
            try:
                await self._reconcile(
                    keys=[self._state_key], args=[p.name, p.limit, p.window_us, p.burst, units]
                )
            except (*_UNREACHABLE_ERRORS, RedisTimeoutError):
                _raise_if_cancelled()
                log.info("limiter: could not correct a reservation by %d tokens: Redis unavailable", delta)

    async def pause(self, seconds: float) -> None:
        """An upstream 429: pause the whole budget (every process of every pool sharing it) and
        mark its buckets empty; callers sleeping on a reservation see it when they wake."""
        if self._metrics:
            self._metrics.upstream_429.labels(self.budget.name).inc()
        pause_us = math.ceil(seconds * 1_000_000)
        self._void_leases()
        self._local_pause_until = max(self._local_pause_until, self._monotonic() + seconds)
        try:
            await self._call(gcra.Pause(pause_us), self._monotonic() + 1.0)
        except (TimeoutError, _RedisUnavailable):
            log.info("limiter: the budget-wide pause did not reach Redis; paused locally only")

    async def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Learn from the upstream's x-ratelimit-* headers.

        A provider limit below the configured one tightens the budget (stored in Redis for every
        agent, expiring so a raised provider limit is picked up again; written again only when it
        changes or half its life passed); remaining == 0 empties our buckets of that kind only
        (requests or tokens): the next request of that kind waits one refill of that bucket.
        """
        limit_names = {p.name for p in self.budget.limits}
        overrides: dict[str, int] = {}  # limit -> the tighter limit, in its units
        empty = [False for _ in self.budget.limits]
        for kind, lname in (("requests", "rpm"), ("tokens", "tpm")):
            limit_raw = headers.get(f"x-ratelimit-limit-{kind}")
            if limit_raw and limit_raw.isdigit() and lname in limit_names:
                params = next(p for p in self.budget.limits if p.name == lname)
                if int(limit_raw) < params.limit * params.unit_size:
                    value = int(limit_raw) // params.unit_size  # in the limit's units
                    written = self._written_overrides.get(lname)
                    fresh = written is not None and self._monotonic() - written[1] < self._override_ttl / 2
                    if not (fresh and written is not None and written[0] == value):
                        overrides[lname] = value
            if headers.get(f"x-ratelimit-remaining-{kind}") == "0":
                unit = "tokens" if kind == "tokens" else "requests"
                empty = [e or p.unit == unit for e, p in zip(empty, self.budget.limits, strict=True)]
        if overrides:
            op = gcra.Override(
                tuple(overrides.get(p.name, 0) for p in self.budget.limits), self._override_ttl * 1_000_000
            )
            try:
                await self._call(op, self._monotonic() + 1.0)
            except (TimeoutError, _RedisUnavailable):
                log.info("limiter: could not store the upstream's tighter limits: Redis unavailable")
            else:
                for lname, limit in overrides.items():
                    self._written_overrides[lname] = (limit, self._monotonic())
        if any(empty):
            self._void_leases()  # the upstream has no room for what they hold
            self._submit(gcra.Empty(tuple(empty)), wait=False)


def _op_args(op: gcra.Op, n: int) -> list[str | int]:
    """One op as the script's 4 + 2n fields (limiter_lua.BATCH)."""
    zeros = [0] * n
    if isinstance(op, gcra.Reserve):
        code = "R" if op.returning else "r"
        return [code, op.priority, op.max_ahead_us, 0, *op.costs, op.deadline_us, *zeros[1:]]
    if isinstance(op, gcra.Lease):
        return ["l", 0, 0, op.wanted, *op.costs, *zeros]
    if isinstance(op, gcra.Confirm):
        return ["c", 0, 0, 0, *op.costs, *op.reserved]
    if isinstance(op, gcra.GiveBack):
        return ["g", 0, 0, 0, *op.costs, *op.reserved]
    if isinstance(op, gcra.Charge):
        return ["k", 0, 0, 0, *op.units, *zeros]
    if isinstance(op, gcra.Empty):
        return ["e", 0, 0, 0, *(int(e) for e in op.buckets), *zeros]
    if isinstance(op, gcra.Override):
        return ["o", op.ttl_us, 0, 0, *op.limits, *zeros]
    return ["p", op.pause_us, 0, 0, *zeros, *zeros]
