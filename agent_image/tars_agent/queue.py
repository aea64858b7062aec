"""The work queue in Redis Streams: one stream per priority per pool, one consumer group.

Every state change that must not half-happen is one Lua script: submit (depth
check + idempotency + XADD), begin (count the attempt and hand out its fencing
token, or dead-letter), append (one attempt's output), complete (store the
result, then XACK + XDEL), fail (requeue or dead-letter) and release (hand back
without counting an attempt). Acknowledged entries are deleted, so XLEN -
pending is exactly the number of tasks waiting.

Fencing: each `begin` increments the task's `fence`; append and complete carry
the attempt's fence and are refused (ClaimLost) once another attempt began, so
an agent that stalled past the claim timeout cannot mix its text into, or
complete, the task another agent took over. Output is kept per attempt
(`out:<id>:<fence>`); the task hash's `fence` names the attempt readers see.

Key lifetimes (every key of a pool carries the hash tag {namespace/pool}):

* `q:<priority>` streams: no TTL while they hold an entry, so pending work is
  never dropped; once emptied they expire after the pool idle TTL (7 days)
  unless a submit, which makes them persistent again, comes first.
* `config` hash: pool idle TTL after its last write (submits, agents every
  few seconds, every finished task).
* `dead` stream: pool idle TTL after the last dead letter (and ~10 000 entries).
* `task:<id>` hash: pool idle TTL from its submit and from each begin; the
  result TTL once done or dead.
* `out:<id>:<fence>` string: the result TTL after its attempt's last write.
* `chunks:<id>` stream: the result TTL after its last event.
* `idem:<key>` string: the idempotency TTL (24 h).

An idle pool's keys are therefore gone a week after its last activity, except
streams that still hold tasks: those wait for an agent. When a pool of the
default Redis is deleted, the operator removes all its keys at once
(tars_operator/pool_keys.py).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tars_agent.priority import PrioritySelector
from tars_agent.tasks import PRIORITIES, InvalidTask, Priority, Task, TaskResult, TaskSpec, parse_task
from tars_contract.contract import (
    DEFAULT_QUEUE_MAX_DEPTH,
    QUEUE_GROUP,
    WAITING_TASKS_SCRIPT,
    pool_key_prefix,
    queue_stream_key,
)

DEAD_LETTER_MAXLEN = 10_000
CHUNKS_MAXLEN = 2_000
POOL_IDLE_TTL_S = 7 * 86_400
# Bounds of the retry-after a full queue answers with; the value itself follows the drain pace.
RETRY_AFTER_MIN_S = 1.0
RETRY_AFTER_MAX_S = 60.0


@dataclass(frozen=True)
class PoolKeys:
    """Key names of one pool; the {namespace/pool} hash tag keeps them in one cluster slot."""

    namespace: str
    pool: str

    @property
    def _prefix(self) -> str:
        return pool_key_prefix(self.namespace, self.pool)

    def stream(self, priority: str) -> str:
        return queue_stream_key(self.namespace, self.pool, priority)

    @property
    def streams(self) -> list[str]:
        return [self.stream(p) for p in PRIORITIES]

    def task(self, task_id: str) -> str:
        return f"{self._prefix}:task:{task_id}"

    def output(self, task_id: str, fence: int) -> str:
        return f"{self._prefix}:out:{task_id}:{fence}"

    def chunks(self, task_id: str) -> str:
        return f"{self._prefix}:chunks:{task_id}"

    def idempotency(self, key: str) -> str:
        return f"{self._prefix}:idem:{key}"

    @property
    def dead(self) -> str:
        return f"{self._prefix}:dead"

    @property
    def config(self) -> str:
        return f"{self._prefix}:config"


def retry_after_s(excess: int, gap_s: float | None, since_last_s: float | None) -> float:
    """When `excess` more tasks will have left the queue at its recent pace.

    `gap_s` is the average time between finished tasks, `since_last_s` the time
    since the last one; a queue that stopped draining is as slow as its silence.
    Nothing ever finished: no pace to go by, the maximum.
    """
    if since_last_s is None:
        return RETRY_AFTER_MAX_S
    pace = max(gap_s if gap_s is not None else since_last_s, since_last_s)
    return round(min(max(excess * pace, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S), 1)


class QueueFull(Exception):
    """Backpressure: the pool's queue is at its maximum depth."""

    def __init__(self, pool: str, depth: int, max_depth: int, retry_after_s: float) -> None:
        super().__init__(
            f"queue of pool {pool} is full ({depth} tasks, maximum {max_depth}); "
            f"retry after {retry_after_s:g}s"
        )
        self.depth = depth
        self.max_depth = max_depth
        self.retry_after_s = retry_after_s


class ClaimLost(Exception):
    """Another attempt of the task began (its entry was reclaimed): this attempt must stop."""


class OutputNotStored(Exception):
    """An attempt's output could not be stored whole: the attempt failed."""


@dataclass(frozen=True)
class Submitted:
    task_id: str
    duplicate: bool  # the idempotency key was seen before: no new task was queued


# Every script's ARGV[1] is the pool idle TTL (seconds).
_COMMON = """
local IDLE_TTL = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function remove(stream, entry)
  redis.call('XACK', stream, 'agents', entry)
  redis.call('XDEL', stream, entry)
  -- an emptied stream expires unless work arrives (submit persists it again)
  if redis.call('XLEN', stream) == 0 then redis.call('EXPIRE', stream, IDLE_TTL) end
end
local function freed(config)
  -- a task left the queue for good: keep the pool's pace (average gap between such events)
  local now = now_ms()
  local last = tonumber(redis.call('HGET', config, 'freed_at_ms'))
  if last then
    local gap = math.max(now - last, 0)
    local avg = tonumber(redis.call('HGET', config, 'freed_gap_ms')) or gap
    redis.call('HSET', config, 'freed_gap_ms', string.format('%.0f', avg + (gap - avg) * 0.2))
  end
  redis.call('HSET', config, 'freed_at_ms', string.format('%.0f', now))
  redis.call('EXPIRE', config, IDLE_TTL)
end
local function dead_letter(task_key, stream, dead, chunks, config, entry, payload, err, attempts, ttl)
  redis.call('XADD', dead, 'MAXLEN', '~', DEAD_MAXLEN, '*', 'task', payload, 'error', err,
             'attempts', tostring(attempts), 'stream', stream, 'entry', entry)
  redis.call('EXPIRE', dead, IDLE_TTL)
  redis.call('HSET', task_key, 'status', 'dead', 'error', err, 'attempts', tostring(attempts))
  redis.call('EXPIRE', task_key, ttl)
  redis.call('XADD', chunks, 'MAXLEN', '~', CHUNKS_MAXLEN, '*', 'event', 'dead', 'error', err)
  redis.call('EXPIRE', chunks, ttl)
  remove(stream, entry)
  freed(config)
end
local function pending(stream, entry, consumer)
  -- the entry's pending record {id, consumer, idle ms, deliveries} if `consumer` holds it
  return redis.call('XPENDING', stream, 'agents', 'IDLE', 0, entry, entry, 1, consumer)[1]
end
local function fenced(task_key, fence)
  return redis.call('HGET', task_key, 'status') == 'running'
     and redis.call('HGET', task_key, 'fence') == fence
end
""".replace("DEAD_MAXLEN", str(DEAD_LETTER_MAXLEN)).replace("CHUNKS_MAXLEN", str(CHUNKS_MAXLEN))

# KEYS: idem, task hash, config, stream x4 (by priority), target stream
# ARGV: idle ttl, task id, task json, priority, given max depth (0: none), idempotency ttl s, default
_SUBMIT = (
    _COMMON
    + """
local existing = redis.call('GET', KEYS[1])
if existing then return {'duplicate', existing} end
local depth = 0
for i = 4, 7 do depth = depth + redis.call('XLEN', KEYS[i]) end
-- the pool's stored limit, the submitter's own (the stricter holds), else the default
local stored = tonumber(redis.call('HGET', KEYS[3], 'max_depth'))
local given = tonumber(ARGV[5])
local max_depth = stored or tonumber(ARGV[7])
if given > 0 then max_depth = math.min(stored or given, given) end
if depth >= max_depth then
  return {'full', tostring(depth), tostring(max_depth), redis.call('HGET', KEYS[3], 'freed_gap_ms') or '',
          redis.call('HGET', KEYS[3], 'freed_at_ms') or '', string.format('%.0f', now_ms())}
end
-- the group must exist before the first entry, or a group created later at '$' would skip it
redis.pcall('XGROUP', 'CREATE', KEYS[8], 'agents', '0', 'MKSTREAM')
redis.call('XADD', KEYS[8], '*', 'task', ARGV[3])
redis.call('PERSIST', KEYS[8])
local t = redis.call('TIME')
redis.call('HSET', KEYS[2], 'status', 'queued', 'priority', ARGV[4], 'attempts', '0',
           'submitted_at', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
redis.call('EXPIRE', KEYS[2], IDLE_TTL)
redis.call('EXPIRE', KEYS[3], IDLE_TTL)
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[6])
return {'queued', ARGV[2]}
"""
)

# KEYS: stream x4.  Creates the group (and an empty stream, which expires unless work arrives).
_ENSURE_GROUPS = (
    _COMMON
    + """
for i = 1, #KEYS do
  redis.pcall('XGROUP', 'CREATE', KEYS[i], 'agents', '0', 'MKSTREAM')
  if redis.call('XLEN', KEYS[i]) == 0 then redis.call('EXPIRE', KEYS[i], IDLE_TTL) end
end
return 0
"""
)

# KEYS: task hash, stream, dead, chunks, config
# ARGV: idle ttl, entry id, consumer, max attempts, payload, result ttl
_BEGIN = (
    _COMMON
    + """
local held = pending(KEYS[2], ARGV[2], ARGV[3])
if not held then return {'lost', 0, 0} end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'done' then
  remove(KEYS[2], ARGV[2])
  return {'done', 0, 0}
end
-- one delivery (XREADGROUP, XAUTOCLAIM: each counts one) begins one attempt, so a begin
-- retried after its reply was lost gets the same attempt instead of counting another
local delivery = ARGV[2] .. '/' .. held[4]
if status == 'running' and redis.call('HGET', KEYS[1], 'delivery') == delivery then
  local again = redis.call('HMGET', KEYS[1], 'attempts', 'fence', 'started_ms')
  return {'run', tonumber(again[1]), tonumber(again[2]), tonumber(again[3]) or now_ms()}
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') + 1
if attempts > tonumber(ARGV[4]) then
  local err = redis.call('HGET', KEYS[1], 'last_error') or 'no error recorded: the agent running it died'
  dead_letter(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[2], ARGV[5],
              'gave up after ' .. (attempts - 1) .. ' attempts: ' .. err, attempts - 1, ARGV[6])
  return {'dead', attempts - 1, 0}
end
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
-- the attempt's start on Redis' clock, like the entry id's submit ms: pickup = their gap
local started = now_ms()
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[3], 'attempts', tostring(attempts),
           'delivery', delivery, 'started_ms', string.format('%.0f', started))
redis.call('EXPIRE', KEYS[1], IDLE_TTL)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', CHUNKS_MAXLEN, '*', 'event', 'start',
           'attempt', tostring(attempts))
redis.call('EXPIRE', KEYS[4], ARGV[6])
return {'run', attempts, fence, started}
""".replace("CHUNKS_MAXLEN", str(CHUNKS_MAXLEN))
)

# KEYS: task hash, output (of this attempt), chunks
# ARGV: idle ttl, fence, offset (bytes this attempt stored so far), text, result ttl
# Returns the output's new length, -1 if another attempt began, -2 if stored text is missing.
_APPEND = (
    _COMMON
    + """
if not fenced(KEYS[1], ARGV[2]) then return -1 end
local len = redis.call('STRLEN', KEYS[2])
local offset = tonumber(ARGV[3])
if len == offset + #ARGV[4] then return len end  -- a retry of an append that did happen
if len ~= offset then return -2 end
len = redis.call('APPEND', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', CHUNKS_MAXLEN, '*', 'event', 'text', 'text', ARGV[4])
return len
""".replace("CHUNKS_MAXLEN", str(CHUNKS_MAXLEN))
)

# KEYS: task hash, stream, output (of this attempt), chunks, config
# ARGV: idle ttl, entry id, consumer, result ttl, prompt tokens, completion tokens, fence,
#       bytes of output stored, the output's tail (appended first, as _APPEND would)
_COMPLETE = (
    _COMMON
    + """
if redis.call('HGET', KEYS[1], 'status') == 'done' then
  -- a retried completion of this same attempt is a success; anything else lost the task
  if redis.call('HGET', KEYS[1], 'fence') == ARGV[7] then return 'done' end
  return 'lost'
end
if not fenced(KEYS[1], ARGV[7]) then return 'lost' end
if ARGV[9] ~= '' then
  if redis.call('STRLEN', KEYS[3]) ~= tonumber(ARGV[8]) then return 'gap' end
  redis.call('APPEND', KEYS[3], ARGV[9])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', CHUNKS_MAXLEN, '*', 'event', 'text', 'text', ARGV[9])
end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'status', 'done', 'worker', ARGV[3], 'prompt_tokens', ARGV[5],
           'completion_tokens', ARGV[6],
           'finished_at', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
redis.call('HDEL', KEYS[1], 'error')
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', CHUNKS_MAXLEN, '*', 'event', 'done')
redis.call('EXPIRE', KEYS[4], ARGV[4])
remove(KEYS[2], ARGV[2])
freed(KEYS[5])
return 'done'
""".replace("CHUNKS_MAXLEN", str(CHUNKS_MAXLEN))
)

# KEYS: task hash, stream, dead, chunks, config
# ARGV: idle ttl, entry id, consumer, error, max attempts, permanent (0/1), payload, result ttl,
#       mode (count: a failed attempt; release: undo its count; none: never begun), fence
_FAIL = (
    _COMMON
    + """
if not pending(KEYS[2], ARGV[2], ARGV[3]) then return 'lost' end
local mode = ARGV[9]
if mode ~= 'none' and not fenced(KEYS[1], ARGV[10]) then return 'lost' end
if mode == 'release' then redis.call('HINCRBY', KEYS[1], 'attempts', -1) end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'last_error', ARGV[4]) end
if ARGV[6] == '1' or (mode == 'count' and attempts >= tonumber(ARGV[5])) then
  local err = ARGV[4]
  if ARGV[6] ~= '1' then err = 'gave up after ' .. attempts .. ' attempts: ' .. err end
  dead_letter(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[2], ARGV[7], err, attempts, ARGV[8])
  return 'dead'
end
redis.call('XACK', KEYS[2], 'agents', ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
redis.call('XADD', KEYS[2], '*', 'task', ARGV[7])
redis.call('HSET', KEYS[1], 'status', 'queued')
return 'requeued'
"""
)

# KEYS: stream.  ARGV: consumer, entry ids...  Resets the idle time of entries this consumer
# still owns (XCLAIM alone would also steal entries another agent reclaimed meanwhile).
# lost: pending under another agent. An entry pending under nobody was acknowledged (its task
# finished, usually by this agent between the heartbeat's list and this script): nothing to stop.
_TOUCH = """
local lost = {}
for i = 2, #ARGV do
  if #redis.call('XPENDING', KEYS[1], 'agents', ARGV[i], ARGV[i], 1, ARGV[1]) > 0 then
    redis.call('XCLAIM', KEYS[1], 'agents', ARGV[1], 0, ARGV[i], 'JUSTID')
  elseif #redis.call('XPENDING', KEYS[1], 'agents', ARGV[i], ARGV[i], 1) > 0 then
    table.insert(lost, ARGV[i])
  end
end
return lost
"""


@dataclass(frozen=True)
class Delivery:
    """One stream entry this agent holds (pending under its consumer name)."""

    priority: str
    entry_id: str
    payload: str
    task: Task | None  # None when the payload does not parse
    parse_error: str | None = None

    @property
    def task_id(self) -> str:
        return self.task.id if self.task else f"unparsable-{self.entry_id}"


@dataclass(frozen=True)
class Attempt:
    """One run of a delivery, begun by `Consumer.begin`; `fence` is its token for every write."""

    delivery: Delivery
    number: int  # the task's attempt count, as results show it
    fence: int
    started_ms: int  # Redis' clock (ms) when the attempt began

    @property
    def pickup_s(self) -> float:
        """Time from the entry's queueing (its stream id: Redis' clock, ms) to this attempt's start:
        for a first attempt submit -> start; for a retry that failed and was requeued, its new
        entry's wait; for an entry reclaimed from a silent agent, the whole time since it was queued."""
        queued_ms = int(self.delivery.entry_id.split("-", 1)[0])
        return max(self.started_ms - queued_ms, 0) / 1000


BeginStatus = Literal["run", "dead", "done", "lost"]


def _new_task_id() -> str:
    return uuid.uuid4().hex


class TaskStore:
    """Client-side operations of a pool queue: submit, results, stats.

    `max_depth` is the submitter's own limit: it holds with no agent running,
    and together with the limit stored for the pool the stricter one holds.
    Without either, contract.DEFAULT_QUEUE_MAX_DEPTH.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        namespace: str,
        pool: str,
        *,
        max_depth: int | None = None,
        idempotency_ttl_s: int = 86_400,
        pool_idle_ttl_s: int = POOL_IDLE_TTL_S,
    ) -> None:
        if max_depth is not None and max_depth < 1:
            raise ValueError(f"max_depth must be at least 1, got {max_depth}")
        self.redis = redis
        self.keys = PoolKeys(namespace, pool)
        self.pool_name = f"{namespace}/{pool}"
        self.max_depth = max_depth
        self._idem_ttl = idempotency_ttl_s
        self._idle_ttl = pool_idle_ttl_s
        self._submit = redis.register_script(_SUBMIT)
        self._waiting = redis.register_script(WAITING_TASKS_SCRIPT)

    async def submit(
        self, spec: TaskSpec, priority: Priority = "normal", idempotency_key: str | None = None
    ) -> Submitted:
        task = Task(id=_new_task_id(), priority=priority, spec=spec, submitted_at=time.time())
        key = idempotency_key or task.id
        k = self.keys
        reply = await self._submit(
            keys=[k.idempotency(key), k.task(task.id), k.config, *k.streams, k.stream(priority)],
            args=[
                self._idle_ttl,
                task.id,
                task.model_dump_json(),
                priority,
                self.max_depth or 0,
                self._idem_ttl,
                DEFAULT_QUEUE_MAX_DEPTH,
            ],
        )
        status = _s(reply[0])
        if status == "full":
            depth, max_depth = int(reply[1]), int(reply[2])
            gap, freed_at, now = (_s(x) for x in reply[3:6])
            retry = retry_after_s(
                depth - max_depth + 1,
                int(gap) / 1000 if gap else None,
                (int(now) - int(freed_at)) / 1000 if freed_at else None,
            )
            raise QueueFull(self.pool_name, depth, max_depth, retry)
        return Submitted(_s(reply[1]), duplicate=status == "duplicate")

    async def set_max_depth(self, max_depth: int) -> None:
        """Store the pool's limit (what agents and `tars queue --set-max-depth` do)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.config, "max_depth", max_depth)
            pipe.expire(self.keys.config, self._idle_ttl)
            await pipe.execute()

    async def result(self, task_id: str) -> TaskResult | None:
        fields = await self.redis.hgetall(self.keys.task(task_id))
        if not fields:
            return None
        f = {_s(a): _s(b) for a, b in fields.items()}
        # the output of the attempt the hash names: the winner once done, else the latest
        output = await self.redis.get(self.keys.output(task_id, int(f["fence"]))) if f.get("fence") else None
        return TaskResult(
            task_id=task_id,
            status=f.get("status", "queued"),  # type: ignore[arg-type]
            output=_s(output) if output else "",
            error=f.get("error"),
            attempts=int(f.get("attempts", 0)),
            worker=f.get("worker"),
            prompt_tokens=int(f["prompt_tokens"]) if f.get("prompt_tokens") else None,
            completion_tokens=int(f["completion_tokens"]) if f.get("completion_tokens") else None,
            finished_at=float(f["finished_at"]) if f.get("finished_at") else None,
        )

    async def waiting(self) -> dict[str, int]:
        """Tasks not yet taken, per priority (XLEN - pending: acked entries are deleted)."""
        counts = await self._waiting(keys=self.keys.streams, args=[QUEUE_GROUP])
        return {priority: max(int(n), 0) for priority, n in zip(PRIORITIES, counts, strict=True)}

    async def stats(self) -> dict[str, Any]:
        waiting = await self.waiting()
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.keys.streams:
                pipe.xlen(stream)
            pipe.xlen(self.keys.dead)
            pipe.hget(self.keys.config, "max_depth")
            *lengths, dead, stored = await pipe.execute()
        limits = [int(stored)] if stored else []
        if self.max_depth is not None:
            limits.append(self.max_depth)
        return {
            "pool": self.pool_name,
            "waiting": waiting,
            "in_progress": {p: int(n) - waiting[p] for p, n in zip(PRIORITIES, lengths, strict=True)},
            "depth": sum(int(n) for n in lengths),
            "max_depth": min(limits, default=DEFAULT_QUEUE_MAX_DEPTH),
            "dead_letter": int(dead),
        }

    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        entries: Any = await self.redis.xrange(self.keys.dead, count=count)
        return [{_s(k): _s(v) for k, v in fields.items()} | {"id": _s(eid)} for eid, fields in entries]


class Consumer:
    """Worker-side operations: take, begin, append, complete, fail, release, reclaim."""

    def __init__(
        self,
        redis: aioredis.Redis,
        namespace: str,
        pool: str,
        consumer: str,
        *,
        max_attempts: int = 3,
        result_ttl_s: int = 86_400,
        claim_idle_ms: int = 30_000,
        pool_idle_ttl_s: int = POOL_IDLE_TTL_S,
        selector: PrioritySelector | None = None,
    ) -> None:
        self.redis = redis
        self.keys = PoolKeys(namespace, pool)
        self.name = consumer
        self.max_attempts = max_attempts
        self.result_ttl_s = result_ttl_s
        self.claim_idle_ms = claim_idle_ms
        self._idle_ttl = pool_idle_ttl_s
        self._selector = selector or PrioritySelector()
        # XAUTOCLAIM position per stream: a scan goes on where the last one stopped, so live
        # entries early in the pending list cannot hide dead ones behind them
        self._reclaim_cursor = dict.fromkeys(PRIORITIES, "0-0")
        self._ensure = redis.register_script(_ENSURE_GROUPS)
        self._waiting = redis.register_script(WAITING_TASKS_SCRIPT)
        self._begin = redis.register_script(_BEGIN)
        self._append = redis.register_script(_APPEND)
        self._complete = redis.register_script(_COMPLETE)
        self._fail = redis.register_script(_FAIL)
        self._touch = redis.register_script(_TOUCH)

    async def ensure_groups(self) -> None:
        await self._ensure(keys=self.keys.streams, args=[self._idle_ttl])

    def _delivery(self, priority: str, entry_id: Any, fields: Mapping[Any, Any]) -> Delivery:
        payload = _s(fields.get("task") or fields.get(b"task") or "")
        try:
            return Delivery(priority, _s(entry_id), payload, parse_task(payload))
        except InvalidTask as exc:
            return Delivery(priority, _s(entry_id), payload, None, str(exc))

    async def take(self, block_ms: int, count: int = 1) -> list[Delivery]:
        """Take up to `count` tasks by the priority rule, waiting up to `block_ms` for one to
        arrive when none waits.

        Of a backlog, as many as `count` and the waiting tasks allow, in the shares that taking
        them one at a time would give, in one round trip. From an empty queue, one task, or
        none when the wait ended empty. Several (at most one per priority) then only when tasks
        of several priorities arrived between the look at the queue and the wait: they are this
        agent's then, to run (handing them back would put them behind newer ones)."""
        try:
            return await self._take(block_ms, count)
        except ResponseError as exc:
            # NOGROUP, no such key: gone before the look; "... no longer exists": while waiting
            if not any(m in str(exc) for m in ("NOGROUP", "no such key", "no longer exists")):
                raise
            await self.ensure_groups()  # an idle stream expired, or Redis came back empty: recreate
            return []

    def _shares(self, waiting: dict[str, int], count: int) -> dict[str, int]:
        """How many of each priority `count` takes one at a time would take."""
        left = dict(waiting)
        shares: dict[str, int] = dict.fromkeys(PRIORITIES, 0)
        for _ in range(count):
            chosen = self._selector.choose(left)
            if chosen is None:
                break
            left[chosen] -= 1
            shares[chosen] += 1
        return {p: n for p, n in shares.items() if n}

    async def _take(self, block_ms: int, count: int) -> list[Delivery]:
        counts = await self._waiting(keys=self.keys.streams, args=[QUEUE_GROUP])
        if any(int(n) < 0 for n in counts):
            raise ResponseError("NOGROUP consumer group missing")
        shares = self._shares({p: int(n) for p, n in zip(PRIORITIES, counts, strict=True)}, count)
        replies: list[Any]
        if shares:
            async with self.redis.pipeline(transaction=False) as pipe:
                for priority, n in shares.items():
                    pipe.xreadgroup(QUEUE_GROUP, self.name, {self.keys.stream(priority): ">"}, count=n)
                replies = await pipe.execute(raise_on_error=False)
            failed = [r for r in replies if isinstance(r, Exception)]
            replies = [r for r in replies if not isinstance(r, Exception)]
            if failed and not any(entries for reply in replies for _, entries in reply or []):
                raise failed[0]
            # what the other reads delivered is pending under this agent now: it runs it, and
            # the next take finds the failed priority's group missing again
        else:
            # Nothing waits: wait in the group itself. Redis hands a new entry to one waiting
            # consumer (the one waiting longest) and the others wait on; a plain XREAD would wake
            # every idle agent of the pool to race for each task.
            streams: dict[Any, Any] = {self.keys.stream(p): ">" for p in PRIORITIES}
            replies = [await self.redis.xreadgroup(QUEUE_GROUP, self.name, streams, count=1, block=block_ms)]
        by_stream = {_s(stream): entries for reply in replies for stream, entries in reply or []}
        return [
            self._delivery(priority, entry_id, fields)
            for priority in PRIORITIES
            for entry_id, fields in by_stream.get(self.keys.stream(priority), [])
        ]

    async def begin(self, d: Delivery) -> tuple[BeginStatus, Attempt | None]:
        """Start an attempt: ('run', attempt); ('dead', None) when out of attempts;
        ('done', None) if the task was already done; ('lost', None) if another agent holds it."""
        k = self.keys
        reply = await self._begin(
            keys=[k.task(d.task_id), k.stream(d.priority), k.dead, k.chunks(d.task_id), k.config],
            args=[self._idle_ttl, d.entry_id, self.name, self.max_attempts, d.payload, self.result_ttl_s],
        )
        status: BeginStatus = _s(reply[0])  # type: ignore[assignment]  # the script's four answers
        if status != "run":
            return status, None
        return status, Attempt(d, int(reply[1]), int(reply[2]), int(reply[3]))

    async def append_output(self, a: Attempt, offset: int, text: str) -> int:
        """Append `text` to the attempt's output, `offset` bytes of which are stored; returns the
        new length. Safe to retry. ClaimLost if another attempt began, OutputNotStored on a gap."""
        k, task_id = self.keys, a.delivery.task_id
        reply = int(
            await self._append(
                keys=[k.task(task_id), k.output(task_id, a.fence), k.chunks(task_id)],
                args=[self._idle_ttl, a.fence, offset, text, self.result_ttl_s],
            )
        )
        if reply == -1:
            raise ClaimLost(
                f"task {task_id}: attempt {a.number} lost its claim (the entry was reclaimed and a newer "
                "attempt began, or the task finished)"
            )
        if reply == -2:
            raise OutputNotStored(
                f"task {task_id}: attempt {a.number} expected {offset} bytes of output in Redis, "
                "found a different amount (output lost)"
            )
        return reply

    async def complete(
        self, a: Attempt, prompt_tokens: int, completion_tokens: int, *, offset: int = 0, tail: str = ""
    ) -> None:
        """Append `tail` to the output (`offset` bytes of which are stored), store the result and
        acknowledge, in one script call; safe to retry. ClaimLost if another attempt began,
        OutputNotStored on a gap."""
        k, d = self.keys, a.delivery
        reply = await self._complete(
            keys=[
                k.task(d.task_id),
                k.stream(d.priority),
                k.output(d.task_id, a.fence),
                k.chunks(d.task_id),
                k.config,
            ],
            args=[
                self._idle_ttl,
                d.entry_id,
                self.name,
                self.result_ttl_s,
                prompt_tokens,
                completion_tokens,
                a.fence,
                offset,
                tail,
            ],
        )
        if _s(reply) == "gap":
            raise OutputNotStored(
                f"task {d.task_id}: attempt {a.number} expected {offset} bytes of output in Redis at "
                "its completion, found a different amount (output lost)"
            )
        if _s(reply) == "lost":
            raise ClaimLost(
                f"task {d.task_id}: attempt {a.number} lost its claim before it completed (the entry was "
                "reclaimed and a newer attempt began, or the task finished)"
            )

    async def fail(self, d: Delivery, a: Attempt | None, error: str, *, permanent: bool = False) -> str:
        """Record a failed attempt `a` (None: the delivery never began, e.g. it does not parse):
        'requeued', 'dead' or 'lost' (another agent took the task over meanwhile)."""
        return await self._fail_script(d, a, error, "count" if a else "none", permanent)

    async def release(self, d: Delivery, a: Attempt | None) -> str:
        """Hand a task back (drain, circuit open) without counting the attempt `a`, if begun."""
        return await self._fail_script(d, a, "", "release" if a else "none", False)

    async def _fail_script(
        self, d: Delivery, a: Attempt | None, error: str, mode: str, permanent: bool
    ) -> str:
        k = self.keys
        reply = await self._fail(
            keys=[k.task(d.task_id), k.stream(d.priority), k.dead, k.chunks(d.task_id), k.config],
            args=[
                self._idle_ttl,
                d.entry_id,
                self.name,
                error,
                self.max_attempts,
                int(permanent),
                d.payload,
                self.result_ttl_s,
                mode,
                a.fence if a else 0,
            ],
        )
        return _s(reply)

    async def reclaim(self, count: int) -> list[Delivery]:
        """Take over entries idle longer than the claim timeout (their agent died or hung)."""
        out: list[Delivery] = []
        for priority in PRIORITIES:
            stream = self.keys.stream(priority)
            cursor = self._reclaim_cursor[priority]
            while len(out) < count:
                try:
                    claimed: Any = await self.redis.xautoclaim(
                        stream, QUEUE_GROUP, self.name, self.claim_idle_ms, cursor, count=count - len(out)
                    )
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    break  # an empty stream that expired: nothing to reclaim
                for entry_id, fields in claimed[1]:
                    if fields:  # None for an entry deleted meanwhile
                        out.append(self._delivery(priority, entry_id, fields))
                cursor = _s(claimed[0])
                if cursor == "0-0":
                    break  # a full pass over the pending entries
            self._reclaim_cursor[priority] = cursor
        return out

    async def touch(self, held: list[Delivery]) -> list[str]:
        """Keep held entries from looking idle; returns entry ids another agent took over (pending
        under it now)."""
        lost: list[str] = []
        for priority in PRIORITIES:
            ids = [d.entry_id for d in held if d.priority == priority]
            if ids:
                reply = await self._touch(keys=[self.keys.stream(priority)], args=[self.name, *ids])
                lost += [_s(x) for x in reply]
        return lost


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
