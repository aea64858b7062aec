"""Client library: submit tasks, wait for or stream their results, inspect a pool's queue."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from tars_agent.queue import Submitted, TaskStore
from tars_agent.tasks import PRIORITIES, InvalidTask, TaskResult, TaskSpec, parse_spec

TERMINAL = ("done", "dead")


@dataclass(frozen=True)
class StreamEvent:
    kind: str  # "start" (an attempt began: drop earlier text), "text", "done", "dead"
    text: str = ""


class TaskClient(TaskStore):
    def __init__(
        self,
        redis: aioredis.Redis,
        namespace: str,
        pool: str,
        max_depth: int | None = None,
    ) -> None:
        """`max_depth`: the pool's queue limit as this submitter knows it (see TaskStore)."""
        super().__init__(redis, namespace, pool, max_depth=max_depth)

    async def submit_payload(
        self,
        payload: str | bytes | dict[str, Any] | TaskSpec,
        priority: str = "normal",
        idempotency_key: str | None = None,
    ) -> Submitted:
        """Validate and submit; raises InvalidTask naming each problem, or QueueFull with a retry-after."""
        if priority not in PRIORITIES:
            raise InvalidTask(f"invalid task: priority {priority!r} is not one of {', '.join(PRIORITIES)}")
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 200:
            raise InvalidTask("invalid task: idempotency key must be 1 to 200 characters")
        spec = payload if isinstance(payload, TaskSpec) else parse_spec(payload)
        return await self.submit(spec, priority, idempotency_key)  # narrowed to a Priority above

    async def wait(self, task_id: str, timeout_s: float) -> TaskResult:
        """Block until the task is done or dead-lettered; TimeoutError at the deadline."""
        deadline = time.monotonic() + timeout_s
        last_id = "0-0"
        while True:
            result = await self.result(task_id)
            if result is not None and result.status in TERMINAL:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"task {task_id} not finished after {timeout_s:g}s "
                    f"(status {result.status if result else 'unknown'})"
                )
            # every state change of a running task adds an event to its chunk stream: wake on it
            reply: Any = await self.redis.xread(
                {self.keys.chunks(task_id): last_id}, count=100, block=max(int(min(remaining, 1.0) * 1000), 1)
            )
            for _stream, entries in reply or []:
                last_id = entries[-1][0]

    async def follow(self, task_id: str, timeout_s: float) -> AsyncIterator[StreamEvent]:
        """Yield output as the agent writes it, until the task is done or dead-lettered."""
        deadline = time.monotonic() + timeout_s
        last_id = "0-0"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"task {task_id} not finished after {timeout_s:g}s")
            reply: Any = await self.redis.xread(
                {self.keys.chunks(task_id): last_id}, count=100, block=max(int(min(remaining, 1.0) * 1000), 1)
            )
            if not reply:
                result = await self.result(task_id)
                if result is None:
                    raise KeyError(f"no task {task_id} in pool {self.pool_name}")
                if result.status in TERMINAL:  # finished before its events could be read (expired)
                    yield StreamEvent(result.status, result.output)
                    return
                continue
            for _stream, entries in reply:
                for entry_id, fields in entries:
                    last_id = entry_id
                    kind = fields.get("event", "")
                    if kind == "text":
                        yield StreamEvent("text", fields.get("text", ""))
                    elif kind in ("start", "done"):
                        yield StreamEvent(kind)
                    elif kind == "dead":
                        yield StreamEvent("dead", fields.get("error", ""))
                    if kind in TERMINAL:
                        return
