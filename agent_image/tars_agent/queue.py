"""The work queue in Redis Streams: one stream per priority per pool, one consumer group.

Every state change that must not half-happen is one Lua script: submit (depth
check + idempotency + XADD), begin (count the attempt, or dead-letter),
complete (store the result, then XACK + XDEL), fail (requeue or dead-letter)
and release (hand back without counting an attempt). Acknowledged entries are
deleted, so XLEN - pending is exactly the number of tasks waiting.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tars_agent.contract import DEFAULT_QUEUE_MAX_DEPTH
from tars_agent.priority import PRIORITIES, PrioritySelector
from tars_agent.tasks import InvalidTask, Priority, Task, TaskResult, TaskSpec, parse_task

GROUP = "agents"
DEAD_LETTER_MAXLEN = 10_000
CHUNKS_MAXLEN = 2_000


@dataclass(frozen=True)
class PoolKeys:
    """Key names of one pool; the {namespace/pool} hash tag keeps them in one cluster slot."""

    namespace: str
    pool: str

    @property
    def _prefix(self) -> str:
        return f"tars:{{{self.namespace}/{self.pool}}}"

    def stream(self, priority: str) -> str:
        return f"{self._prefix}:q:{priority}"

    @property
    def streams(self) -> list[str]:
        return [self.stream(p) for p in PRIORITIES]

    def task(self, task_id: str) -> str:
        return f"{self._prefix}:task:{task_id}"

    def output(self, task_id: str) -> str:
        return f"{self._prefix}:out:{task_id}"

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


@dataclass(frozen=True)
class Submitted:
    task_id: str
    duplicate: bool  # the idempotency key was seen before: no new task was queued


# KEYS: idem, task hash, config, stream x4 (by priority), target stream
# ARGV: task id, task json, priority, default max depth, idempotency ttl s
_SUBMIT = """
local existing = redis.call('GET', KEYS[1])
if existing then return {'duplicate', existing} end
local depth = 0
for i = 4, 7 do depth = depth + redis.call('XLEN', KEYS[i]) end
local max_depth = tonumber(redis.call('HGET', KEYS[3], 'max_depth') or ARGV[4])
if depth >= max_depth then return {'full', tostring(depth), tostring(max_depth)} end
-- the group must exist before the first entry, or a group created later at '$' would skip it
redis.pcall('XGROUP', 'CREATE', KEYS[8], 'agents', '0', 'MKSTREAM')
redis.call('XADD', KEYS[8], '*', 'task', ARGV[2])
local t = redis.call('TIME')
redis.call('HSET', KEYS[2], 'status', 'queued', 'priority', ARGV[3], 'attempts', '0',
           'submitted_at', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[5])
return {'queued', ARGV[1]}
"""

_DEAD_LETTER = """
local function dead_letter(task_key, stream, dead, entry, payload, err, attempts, ttl, output, chunks)
  redis.call('XADD', dead, 'MAXLEN', '~', ARGV_DEAD_MAXLEN, '*', 'task', payload, 'error', err,
             'attempts', tostring(attempts), 'stream', stream, 'entry', entry)
  redis.call('HSET', task_key, 'status', 'dead', 'error', err)
  redis.call('EXPIRE', task_key, ttl)
  redis.call('XADD', chunks, 'MAXLEN', '~', ARGV_CHUNKS_MAXLEN, '*', 'event', 'dead', 'error', err)
  redis.call('EXPIRE', chunks, ttl)
  redis.call('EXPIRE', output, ttl)
  redis.call('XACK', stream, 'agents', entry)
  redis.call('XDEL', stream, entry)
end
local function owned(stream, entry, consumer)
  return #redis.call('XPENDING', stream, 'agents', 'IDLE', 0, entry, entry, 1, consumer) > 0
end
""".replace("ARGV_DEAD_MAXLEN", str(DEAD_LETTER_MAXLEN)).replace("ARGV_CHUNKS_MAXLEN", str(CHUNKS_MAXLEN))

# KEYS: task hash, stream, dead, output, chunks
# ARGV: entry id, consumer, max attempts, payload, result ttl
_BEGIN = (
    _DEAD_LETTER
    + """
if redis.call('HGET', KEYS[1], 'status') == 'done' then
  redis.call('XACK', KEYS[2], 'agents', ARGV[1])
  redis.call('XDEL', KEYS[2], ARGV[1])
  return {'done', 0}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[3]) then
  local err = redis.call('HGET', KEYS[1], 'last_error') or 'no error recorded: the agent running it died'
  dead_letter(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[4],
              'gave up after ' .. (attempts - 1) .. ' attempts: ' .. err, attempts - 1, ARGV[5],
              KEYS[4], KEYS[5])
  return {'dead', attempts - 1}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[2])
redis.call('DEL', KEYS[4])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV_CHUNKS_MAXLEN, '*',
           'event', 'start', 'attempt', tostring(attempts))
redis.call('EXPIRE', KEYS[5], ARGV[5])
return {'run', attempts}
""".replace("ARGV_CHUNKS_MAXLEN", str(CHUNKS_MAXLEN))
)

# KEYS: task hash, stream, output, chunks
# ARGV: entry id, consumer, result ttl, prompt tokens, completion tokens
_COMPLETE = """
local first = redis.call('HGET', KEYS[1], 'status') ~= 'done'
if first then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'status', 'done', 'worker', ARGV[2], 'prompt_tokens', ARGV[4],
             'completion_tokens', ARGV[5],
             'finished_at', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
  redis.call('HDEL', KEYS[1], 'error')
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV_CHUNKS_MAXLEN, '*', 'event', 'done')
  redis.call('EXPIRE', KEYS[4], ARGV[3])
end
redis.call('XACK', KEYS[2], 'agents', ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
if first then return 1 end
return 0
""".replace("ARGV_CHUNKS_MAXLEN", str(CHUNKS_MAXLEN))

# KEYS: task hash, stream, dead, output, chunks
# ARGV: entry id, consumer, error, max attempts, permanent (0/1), payload, result ttl, count attempt (0/1)
_FAIL = (
    _DEAD_LETTER
    + """
if not owned(KEYS[2], ARGV[1], ARGV[2]) then return 'lost' end
if ARGV[8] == '0' then redis.call('HINCRBY', KEYS[1], 'attempts', -1) end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'last_error', ARGV[3]) end
if ARGV[5] == '1' or attempts >= tonumber(ARGV[4]) then
  local err = ARGV[3]
  if ARGV[5] ~= '1' then err = 'gave up after ' .. attempts .. ' attempts: ' .. err end
  dead_letter(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[6], err, attempts, ARGV[7], KEYS[4], KEYS[5])
  return 'dead'
end
redis.call('XACK', KEYS[2], 'agents', ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[2], '*', 'task', ARGV[6])
redis.call('HSET', KEYS[1], 'status', 'queued')
return 'requeued'
"""
)

# KEYS: stream.  ARGV: consumer, entry ids...  Resets the idle time of entries this consumer
# still owns (XCLAIM alone would also steal entries another agent reclaimed meanwhile).
_TOUCH = """
local lost = {}
for i = 2, #ARGV do
  if #redis.call('XPENDING', KEYS[1], 'agents', ARGV[i], ARGV[i], 1, ARGV[1]) > 0 then
    redis.call('XCLAIM', KEYS[1], 'agents', ARGV[1], 0, ARGV[i], 'JUSTID')
  else
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


def _new_task_id() -> str:
    return uuid.uuid4().hex


class TaskStore:
    """Client-side operations of a pool queue: submit, results, stats."""

    def __init__(
        self,
        redis: aioredis.Redis,
        namespace: str,
        pool: str,
        *,
        default_max_depth: int = DEFAULT_QUEUE_MAX_DEPTH,
        idempotency_ttl_s: int = 86_400,
        full_retry_after_s: float = 5.0,
    ) -> None:
        self.redis = redis
        self.keys = PoolKeys(namespace, pool)
        self.pool_name = f"{namespace}/{pool}"
        self._default_max_depth = default_max_depth
        self._idem_ttl = idempotency_ttl_s
        self._full_retry_after = full_retry_after_s
        self._submit = redis.register_script(_SUBMIT)

    async def submit(
        self, spec: TaskSpec, priority: Priority = "normal", idempotency_key: str | None = None
    ) -> Submitted:
        task = Task(id=_new_task_id(), priority=priority, spec=spec, submitted_at=time.time())
        key = idempotency_key or task.id
        k = self.keys
        reply = await self._submit(
            keys=[k.idempotency(key), k.task(task.id), k.config, *k.streams, k.stream(priority)],
            args=[task.id, task.model_dump_json(), priority, self._default_max_depth, self._idem_ttl],
        )
        status = _s(reply[0])
        if status == "full":
            raise QueueFull(self.pool_name, int(reply[1]), int(reply[2]), self._full_retry_after)
        return Submitted(_s(reply[1]), duplicate=status == "duplicate")

    async def set_max_depth(self, max_depth: int) -> None:
        await self.redis.hset(self.keys.config, "max_depth", max_depth)

    async def result(self, task_id: str) -> TaskResult | None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.keys.task(task_id))
            pipe.get(self.keys.output(task_id))
            fields, output = await pipe.execute()
        if not fields:
            return None
        f = {_s(a): _s(b) for a, b in fields.items()}
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
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.keys.streams:
                pipe.xlen(stream)
                pipe.xinfo_groups(stream)
            replies = await pipe.execute(raise_on_error=False)
        out: dict[str, int] = {}
        for i, priority in enumerate(PRIORITIES):
            length, groups = replies[2 * i], replies[2 * i + 1]
            pending = _group_field(groups, "pending")
            out[priority] = max(int(length) - int(pending or 0), 0) if isinstance(length, int) else 0
        return out

    async def stats(self) -> dict[str, Any]:
        waiting = await self.waiting()
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.keys.streams:
                pipe.xlen(stream)
            pipe.xlen(self.keys.dead)
            pipe.hget(self.keys.config, "max_depth")
            *lengths, dead, max_depth = await pipe.execute()
        return {
            "pool": self.pool_name,
            "waiting": waiting,
            "in_progress": {p: int(n) - waiting[p] for p, n in zip(PRIORITIES, lengths, strict=True)},
            "depth": sum(int(n) for n in lengths),
            "max_depth": int(max_depth) if max_depth else self._default_max_depth,
            "dead_letter": int(dead),
        }

    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        entries: Any = await self.redis.xrange(self.keys.dead, count=count)
        return [{_s(k): _s(v) for k, v in fields.items()} | {"id": _s(eid)} for eid, fields in entries]


class Consumer:
    """Worker-side operations: take, begin, complete, fail, release, reclaim."""

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
        selector: PrioritySelector | None = None,
    ) -> None:
        self.redis = redis
        self.keys = PoolKeys(namespace, pool)
        self.store = TaskStore(redis, namespace, pool)
        self.name = consumer
        self.max_attempts = max_attempts
        self.result_ttl_s = result_ttl_s
        self.claim_idle_ms = claim_idle_ms
        self._selector = selector or PrioritySelector()
        self._begin = redis.register_script(_BEGIN)
        self._complete = redis.register_script(_COMPLETE)
        self._fail = redis.register_script(_FAIL)
        self._touch = redis.register_script(_TOUCH)

    async def ensure_groups(self) -> None:
        for stream in self.keys.streams:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _delivery(self, priority: str, entry_id: Any, fields: Mapping[Any, Any]) -> Delivery:
        payload = _s(fields.get("task") or fields.get(b"task") or "")
        try:
            return Delivery(priority, _s(entry_id), payload, parse_task(payload))
        except InvalidTask as exc:
            return Delivery(priority, _s(entry_id), payload, None, str(exc))

    async def take(self, block_ms: int) -> Delivery | None:
        """Take the next task by the priority rule, waiting up to `block_ms` for one to arrive."""
        try:
            return await self._take(block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc) and "no such key" not in str(exc):
                raise
            await self.ensure_groups()  # Redis came back empty (no persistence): recreate
            return None

    async def _take(self, block_ms: int) -> Delivery | None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.keys.streams:
                pipe.xlen(stream)
                pipe.xinfo_groups(stream)
            replies = await pipe.execute()
        waiting: dict[str, int] = {}
        last_delivered: dict[str, str] = {}
        for i, priority in enumerate(PRIORITIES):
            length, groups = replies[2 * i], replies[2 * i + 1]
            if _group_field(groups, "name") is None:
                raise ResponseError("NOGROUP consumer group missing")
            waiting[priority] = int(length) - int(_group_field(groups, "pending") or 0)
            last_delivered[priority] = _s(_group_field(groups, "last-delivered-id") or "0-0")
        chosen = self._selector.choose(waiting)
        if chosen is not None:
            reply: Any = await self.redis.xreadgroup(
                GROUP, self.name, {self.keys.stream(chosen): ">"}, count=1
            )
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    return self._delivery(chosen, entry_id, fields)
            return None  # another agent took it first
        # Nothing waits: block until an entry newer than the group's last delivery arrives
        # (XREAD, not XREADGROUP, so waking up takes nothing), then go through the rule again.
        await self.redis.xread(
            {self.keys.stream(p): last_delivered[p] for p in PRIORITIES}, count=1, block=block_ms
        )
        return None

    async def begin(self, d: Delivery) -> tuple[str, int]:
        """Count an attempt: ('run', n), ('dead', n) when out of attempts, or ('done', 0)."""
        k = self.keys
        reply = await self._begin(
            keys=[k.task(d.task_id), k.stream(d.priority), k.dead, k.output(d.task_id), k.chunks(d.task_id)],
            args=[d.entry_id, self.name, self.max_attempts, d.payload, self.result_ttl_s],
        )
        return _s(reply[0]), int(reply[1])

    async def append_output(self, d: Delivery, text: str) -> None:
        k = self.keys
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.append(k.output(d.task_id), text)
            pipe.xadd(
                k.chunks(d.task_id), {"event": "text", "text": text}, maxlen=CHUNKS_MAXLEN, approximate=True
            )
            await pipe.execute()

    async def complete(self, d: Delivery, prompt_tokens: int, completion_tokens: int) -> bool:
        """Store the result and acknowledge; False if another agent had completed it first."""
        k = self.keys
        reply = await self._complete(
            keys=[k.task(d.task_id), k.stream(d.priority), k.output(d.task_id), k.chunks(d.task_id)],
            args=[d.entry_id, self.name, self.result_ttl_s, prompt_tokens, completion_tokens],
        )
        return bool(int(reply))

    async def fail(
        self, d: Delivery, error: str, *, permanent: bool = False, count_attempt: bool = True
    ) -> str:
        """'requeued', 'dead' or 'lost' (another agent reclaimed it meanwhile)."""
        k = self.keys
        reply = await self._fail(
            keys=[k.task(d.task_id), k.stream(d.priority), k.dead, k.output(d.task_id), k.chunks(d.task_id)],
            args=[
                d.entry_id,
                self.name,
                error,
                self.max_attempts,
                int(permanent),
                d.payload,
                self.result_ttl_s,
                int(count_attempt),
            ],
        )
        return _s(reply)

    async def release(self, d: Delivery) -> str:
        """Hand a task back untouched (drain, circuit open): requeued without counting the attempt."""
        return await self.fail(d, "", count_attempt=False)

    async def reclaim(self, count: int) -> list[Delivery]:
        """Take over entries idle longer than the claim timeout (their agent died or hung)."""
        out: list[Delivery] = []
        for priority in PRIORITIES:
            if len(out) >= count:
                break
            claimed: Any = await self.redis.xautoclaim(
                self.keys.stream(priority),
                GROUP,
                self.name,
                self.claim_idle_ms,
                "0-0",
                count=count - len(out),
            )
            for entry_id, fields in claimed[1]:
                if fields:  # None for an entry deleted meanwhile
                    out.append(self._delivery(priority, entry_id, fields))
        return out

    async def touch(self, held: list[Delivery]) -> list[str]:
        """Keep held entries from looking idle; returns entry ids another agent took over."""
        lost: list[str] = []
        for priority in PRIORITIES:
            ids = [d.entry_id for d in held if d.priority == priority]
            if ids:
                reply = await self._touch(keys=[self.keys.stream(priority)], args=[self.name, *ids])
                lost += [_s(x) for x in reply]
        return lost


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _group_field(groups: Any, name: str) -> Any:
    """A field of group 'agents' from an XINFO GROUPS reply (None if missing or an error)."""
    if not isinstance(groups, list):
        return None
    for group in groups:
        g = {_s(k): v for k, v in group.items()}
        if _s(g.get("name", "")) == GROUP:
            return g.get(name)
    return None
