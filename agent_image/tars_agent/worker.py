"""`tars-agent`: the program in every agent pod.

Takes tasks from the pool's queue (priority rule in tars_agent.priority), runs
them through the shared limiter and the LLM client, stores results, and serves
/metrics, /healthz, /readyz, /status and POST /drain. SIGTERM (or SIGINT)
drains: no new work, in-flight tasks get the grace period, whatever is left is
handed back to the queue, then the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tars_agent.aio import cancel_and_wait
from tars_agent.circuit import CircuitBreaker, CircuitOpenError, CircuitState
from tars_agent.limiter import Budget, LimiterTimeout, RequestTooLarge, SharedLimiter
from tars_agent.llm import LLMClient, LLMConfig, UpstreamError
from tars_agent.memory import allowed_inflight, cgroup_memory_limit, process_rss
from tars_agent.metrics import AgentMetrics
from tars_agent.queue import Attempt, ClaimLost, Consumer, Delivery, OutputNotStored, TaskStore
from tars_agent.settings import AgentSettings, SettingsError, load_settings
from tars_contract import contract

log = logging.getLogger("tars_agent")
T = TypeVar("T")

HEARTBEAT_INTERVAL_S = 1.0
DEPTH_EVERY_BEATS = 5
TAKE_BLOCK_MS = 500
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
# Queue writes are retried this long while Redis is away (e.g. restarting); after that the
# entry stays pending and another agent reclaims it: late, but not lost.
STORE_RETRY_S = 60.0


class RedisAway(Exception):
    """A queue write kept failing for STORE_RETRY_S: Redis is unreachable."""


class OutputWriter:
    """Buffers streamed text and appends it to the task's result in small batches."""

    def __init__(
        self, flush: Callable[[str], Awaitable[None]], max_bytes: int = 4096, max_delay_s: float = 0.1
    ) -> None:
        self._flush = flush
        self._max_bytes = max_bytes
        self._max_delay = max_delay_s
        self._parts: list[str] = []
        self._size = 0
        self._last = time.monotonic()

    async def write(self, text: str) -> None:
        self._parts.append(text)
        self._size += len(text)
        if self._size >= self._max_bytes or time.monotonic() - self._last >= self._max_delay:
            await self.flush()

    async def flush(self) -> None:
        if text := self.take():
            await self._flush(text)
        self._last = time.monotonic()

    def take(self) -> str:
        """The buffered text, which the caller stores itself (the completion carries the tail)."""
        text = "".join(self._parts)
        self._parts, self._size = [], 0
        return text


class Agent:
    def __init__(self, settings: AgentSettings, *, metrics: AgentMetrics | None = None) -> None:
        self.settings = s = settings
        self.metrics = metrics or AgentMetrics()
        password = s.redis_password.get_secret_value() if s.redis_password else None
        self.redis = aioredis.Redis.from_url(
            s.redis_url,
            password=password,
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=2,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 2),
        )
        # The limiter's own connection: short timeouts and no retries, so a Redis outage turns
        # into degraded mode in a quarter second instead of stalling every caller.
        self.limiter_redis = aioredis.Redis.from_url(
            s.redis_url,
            password=password,
            decode_responses=True,
            socket_timeout=0.25,
            socket_connect_timeout=0.25,
            retry=Retry(NoBackoff(), 0),
        )
        self.consumer = Consumer(
            self.redis,
            s.namespace,
            s.pool,
            s.pod_name,
            max_attempts=s.max_attempts,
            result_ttl_s=s.result_ttl_seconds,
            claim_idle_ms=int(s.claim_idle_seconds * 1000),
        )
        self.store = TaskStore(self.redis, s.namespace, s.pool)
        limiter = None
        if s.requests_per_minute or s.requests_per_hour or s.tokens_per_minute:
            budget = Budget.from_rates(
                s.budget,
                requests_per_minute=s.requests_per_minute,
                requests_per_hour=s.requests_per_hour,
                tokens_per_minute=s.tokens_per_minute,
                burst_fraction=s.burst_fraction,
            )
            limiter = SharedLimiter(
                self.limiter_redis,
                budget,
                reserve_fraction=s.reserve_fraction,
                metrics=self.metrics,
            )
        self.breaker = CircuitBreaker(s.circuit_failures, s.circuit_open_seconds)
        self.llm = LLMClient(
            LLMConfig(
                base_url=s.llm_base_url,
                api_key=s.llm_api_key,
                model=s.llm_model,
                http2=s.llm_http2,
                max_retries=s.llm_max_retries,
                cache_entries=s.llm_cache_entries,
                # a connection per slot, kept alive: no task waits for a connection, none reconnects
                max_connections=s.concurrency,
                max_keepalive=s.concurrency,
            ),
            limiter=limiter,
            breaker=self.breaker,
            metrics=self.metrics,
        )
        self.draining = False
        self.redis_ready = False
        self.inflight: dict[asyncio.Task[None], Delivery] = {}
        self._lost: set[asyncio.Task[None]] = set()  # cancelled because another agent took the task
        self._memory_allowed = s.concurrency
        self._stop = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._state_changed = asyncio.Event()  # in flight or draining changed: publish it now
        self._runner: web.AppRunner | None = None

    # -- control -------------------------------------------------------------------------
    def request_drain(self) -> None:
        """Stop taking new work (POST /drain); SIGTERM still decides when to exit."""
        if not self.draining:
            log.info("draining: no new tasks from now on")
        self.draining = True
        self.metrics.draining.set(1)
        self._slot_freed.set()
        self._state_changed.set()

    def request_stop(self) -> None:
        self.request_drain()
        self._stop.set()

    def status(self) -> dict[str, object]:
        # slots: the tasks it may hold now (its concurrency, cut by memory admission): the operator
        # counts free slots as warm room (policy/observe.py)
        slots = min(self.settings.concurrency, self._memory_allowed)
        return {"inflight": len(self.inflight), "draining": self.draining, "slots": max(slots, 1)}

    # -- HTTP ----------------------------------------------------------------------------
    def http_app(self) -> web.Application:
        app = web.Application()

        async def metrics(_r: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

        async def healthz(_r: web.Request) -> web.Response:
            return web.Response(text="ok")

        async def readyz(_r: web.Request) -> web.Response:
            if self.draining:
                return web.Response(status=503, text="draining")
            if not self.redis_ready:
                return web.Response(status=503, text="redis unreachable")
            return web.Response(text="ready")

        async def status(request: web.Request) -> web.Response:
            if refused := self._refuse_unauthorized(request):
                return refused
            return web.json_response(self.status())

        async def drain(request: web.Request) -> web.Response:
            if refused := self._refuse_unauthorized(request):
                return refused
            self.request_drain()
            return web.json_response(self.status(), status=202)

        app.router.add_get(contract.PATH_METRICS, metrics)
        app.router.add_get(contract.PATH_HEALTHZ, healthz)
        app.router.add_get(contract.PATH_READYZ, readyz)
        app.router.add_get(contract.PATH_STATUS, status)
        app.router.add_post(contract.PATH_DRAIN, drain)
        return app

    def _refuse_unauthorized(self, request: web.Request) -> web.Response | None:
        """None when the request carries the pool's token; else the refusal (secrets never echoed)."""
        expected = self.settings.agent_token
        if expected is None:
            # Fail closed: an agent started without a token cannot be drained by anyone.
            return web.Response(
                status=503, text=f"control endpoints disabled: {contract.ENV_AGENT_TOKEN} is not set"
            )
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            problem = "missing Authorization: Bearer <token> header"
        elif hmac.compare_digest(given.strip().encode(), expected.get_secret_value().encode()):
            return None
        else:
            problem = "invalid token"
        log.warning("refused %s %s from %s: %s", request.method, request.path, request.remote, problem)
        return web.Response(status=401, text=problem, headers={"WWW-Authenticate": "Bearer"})

    # -- main ----------------------------------------------------------------------------
    async def run(self) -> None:
        s = self.settings
        self._runner = web.AppRunner(self.http_app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, s.http_bind, s.http_port).start()
        log.info(
            "agent %s of pool %s/%s serving on %s:%d",
            s.pod_name,
            s.namespace,
            s.pool,
            s.http_bind,
            s.http_port,
        )
        background = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._reclaim_loop()),
            asyncio.create_task(self._publish_state_loop()),
        ]
        taker = asyncio.create_task(self._take_loop())
        try:
            await self._stop.wait()
            await taker
            await self._finish_inflight()
        finally:
            await cancel_and_wait([*background, taker])
            await self.llm.aclose()
            await self._runner.cleanup()
            await self.redis.aclose()
            if self.llm.limiter is not None:
                await self.llm.limiter.aclose()
            await self.limiter_redis.aclose()
            log.info("agent %s stopped", s.pod_name)

    async def _finish_inflight(self) -> None:
        # Keep a tenth of the grace (at most 3 s) to hand unfinished work back before the kill.
        grace = self.settings.drain_grace_seconds
        budget = max(grace - min(grace * 0.1, 3.0), 0.0)
        if self.inflight:
            log.info("waiting up to %.1fs for %d in-flight tasks", budget, len(self.inflight))
            await asyncio.wait(list(self.inflight), timeout=budget)
        left = list(self.inflight)
        if left:
            log.warning("grace period over: handing back %d unfinished tasks", len(left))
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)

    @property
    def free_slots(self) -> int:
        """Tasks this agent may take now: its concurrency, cut by memory admission, minus its work."""
        return min(self.settings.concurrency, self._memory_allowed) - len(self.inflight)

    async def _wait_for_slot(self) -> None:
        self._slot_freed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._slot_freed.wait(), timeout=0.2)

    async def _take_loop(self) -> None:
        failures = 0
        while not self.draining:
            if self.free_slots <= 0 or self.breaker.state is CircuitState.OPEN:
                await self._wait_for_slot()
                continue
            try:
                deliveries = await self.consumer.take(TAKE_BLOCK_MS, self.free_slots)
                failures = 0
                self.redis_ready = True
            except RedisError as exc:
                failures += 1
                self.redis_ready = False
                log.warning("cannot read the queue: %s", exc)
                await asyncio.sleep(min(0.1 * 2**failures, 2.0))
                continue
            if self.draining:
                for delivery in deliveries:
                    await self._store_or_leave(functools.partial(self.consumer.release, delivery, None))
                break
            for delivery in deliveries:
                self._spawn(delivery)

    async def _reclaim_loop(self) -> None:
        interval = max(self.settings.claim_idle_seconds / 2, 0.2)
        while True:
            await asyncio.sleep(interval)
            if self.draining:
                continue
            free = self.free_slots
            if free <= 0:
                continue
            try:
                held = {d.entry_id for d in self.inflight.values()}
                for delivery in await self.consumer.reclaim(free):
                    if delivery.entry_id in held:
                        continue  # this agent's own entry, idle while it stalled: its attempt goes on
                    log.info(
                        "reclaimed task %s (entry %s) from a silent agent",
                        delivery.task_id,
                        delivery.entry_id,
                    )
                    self._spawn(delivery)
            except RedisError as exc:
                log.warning("reclaim failed: %s", exc)

    async def _heartbeat_loop(self) -> None:
        s = self.settings
        beat = 0
        while True:
            # The limit is read every beat: an in-place resize changes it under the running agent.
            self._memory_allowed = allowed_inflight(process_rss(), cgroup_memory_limit(), s.concurrency)
            self.metrics.busy.set(len(self.inflight))
            try:
                lost = await self.consumer.touch(list(self.inflight.values()))
                if lost:
                    self._stop_lost(set(lost))
                if beat % DEPTH_EVERY_BEATS == 0:
                    # rewritten now and then so a Redis that lost its data gets the limit back
                    await self.store.set_max_depth(s.queue_max_depth)
                    for priority, n in (await self.store.waiting()).items():
                        self.metrics.queue_depth.labels(s.pool, priority).set(n)
                self.redis_ready = True
            except RedisError as exc:
                self.redis_ready = False
                log.warning("heartbeat failed: %s", exc)
            beat += 1
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _publish_state_loop(self) -> None:
        """Keep what GET /status answers in Redis for the operator (contract.agent_state_key):
        after a change (at most AGENT_STATE_MIN_GAP_SECONDS after the last write), else every
        AGENT_STATE_REFRESH_SECONDS; it expires when the agent is gone. A failed write only costs
        the operator a GET /status until the next one lands."""
        s = self.settings
        key = contract.agent_state_key(s.namespace, s.pool, s.pod_name)
        # Ends by itself once the agent stops (its last write says draining): a cancel that meets
        # the event set by the stop can be lost on 3.11, and run() waits for this loop.
        while not self._stop.is_set():
            self._state_changed.clear()
            written = time.monotonic()
            try:
                await self.redis.set(key, json.dumps(self.status()), ex=contract.AGENT_STATE_TTL_SECONDS)
            except RedisError as exc:
                log.debug("publishing the agent's state failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(contract.AGENT_STATE_REFRESH_SECONDS):
                    await self._state_changed.wait()
            # the changes that follow within the gap go out with this one
            await asyncio.sleep(max(written + contract.AGENT_STATE_MIN_GAP_SECONDS - time.monotonic(), 0))

    def _stop_lost(self, entry_ids: set[str]) -> None:
        """Cancel the local work on entries another agent took over (this agent stalled)."""
        for task, d in list(self.inflight.items()):
            if d.entry_id in entry_ids and task not in self._lost:
                log.warning(
                    "task %s: entry %s was taken over by another agent; stopping this attempt",
                    d.task_id,
                    d.entry_id,
                )
                self._lost.add(task)
                task.cancel()

    def _spawn(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._process(delivery))
        self.inflight[task] = delivery
        self.metrics.busy.set(len(self.inflight))
        self._state_changed.set()

        def done(t: asyncio.Task[None]) -> None:
            self.inflight.pop(t, None)
            self._lost.discard(t)
            self.metrics.busy.set(len(self.inflight))
            self._slot_freed.set()
            self._state_changed.set()

        task.add_done_callback(done)

    async def _store(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run a queue write, retrying while Redis is unreachable; RedisAway if it never came back."""
        deadline = time.monotonic() + STORE_RETRY_S
        delay = 0.05
        while True:
            try:
                return await op()
            except _REDIS_DOWN as exc:
                if time.monotonic() + delay > deadline:
                    raise RedisAway(f"Redis unreachable for {STORE_RETRY_S:.0f}s: {exc}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _store_or_leave(self, op: Callable[[], Awaitable[T]]) -> T | None:
        """`_store`, or None when Redis stayed away: the entry stays pending for another agent."""
        try:
            return await self._store(op)
        except RedisAway as exc:
            log.error("gave up storing, the task stays pending for another agent: %s", exc)
            return None

    async def _process(self, d: Delivery) -> None:
        start = time.monotonic()
        outcome = "error"
        c = self.consumer
        attempt: Attempt | None = None
        try:
            if d.task is None:
                await self._store(lambda: c.fail(d, None, d.parse_error or "invalid payload", permanent=True))
                outcome = "invalid"
                return
            status, attempt = await self._store(lambda: c.begin(d))
            if attempt is None:
                outcome = {"dead": "dead_letter", "done": "duplicate", "lost": "lost"}[status]
                return
            a = attempt
            self.metrics.task_pickup.labels(d.priority).observe(a.pickup_s)
            stored = 0  # bytes of this attempt's output in Redis

            async def store_text(text: str) -> None:
                nonlocal stored
                try:
                    stored = await self._store(lambda: c.append_output(a, stored, text))
                except RedisAway as exc:
                    # a gap in the output must fail the attempt, never end in a `done` task
                    raise OutputNotStored(f"task {d.task_id}: output not stored: {exc}") from exc

            writer = OutputWriter(store_text)
            result = await self.llm.complete(
                d.task.spec, d.task.priority, writer.write, start + self.settings.task_timeout_seconds
            )
            tail = writer.take()
            await self._store(
                lambda: c.complete(
                    a, result.prompt_tokens, result.completion_tokens, offset=stored, tail=tail
                )
            )
            outcome = "done"
        except ClaimLost as exc:
            log.warning("%s; this attempt stopped", exc)
            outcome = "lost"
        except RedisAway as exc:
            log.error("task %s stays pending for another agent: %s", d.task_id, exc)
        except (CircuitOpenError, LimiterTimeout) as exc:
            log.info("task %s handed back: %s", d.task_id, exc)
            await self._store_or_leave(lambda: c.release(d, attempt))
            outcome = "released"
        except RequestTooLarge as exc:
            reason = str(exc)
            await self._store_or_leave(lambda: c.fail(d, attempt, reason, permanent=True))
            outcome = "dead_letter"
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current in self._lost:
                outcome = "lost"  # the entry is another agent's now: nothing to hand back
            else:
                await self._store_or_leave(lambda: c.release(d, attempt))
                outcome = "released"
            raise
        except (UpstreamError, OutputNotStored) as exc:
            outcome = await self._failed(d, attempt, str(exc))
        except Exception as exc:  # a bug must not kill the agent; the task is retried, then dead-lettered
            log.exception("task %s failed in the agent", d.task_id)
            outcome = await self._failed(d, attempt, f"agent error: {exc!r}")
        finally:
            self.metrics.tasks.labels(outcome).inc()
            self.metrics.task_duration.observe(time.monotonic() - start)

    async def _failed(self, d: Delivery, attempt: Attempt | None, reason: str) -> str:
        """Record a failed attempt; the outcome: failed (requeued), dead_letter, lost, or error
        when Redis stayed away (the entry stays pending for another agent)."""
        verdict = await self._store_or_leave(lambda: self.consumer.fail(d, attempt, reason))
        return {"dead": "dead_letter", "lost": "lost", "requeued": "failed"}.get(verdict or "", "error")


async def _amain(settings: AgentSettings) -> None:
    agent = Agent(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.request_stop)
    await agent.run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tars-agent", description="TARS agent: runs tasks of one pool")
    parser.add_argument(
        "--drain-grace",
        type=float,
        help=f"seconds to finish in-flight work on SIGTERM "
        f"(env {contract.ENV_DRAIN_GRACE_SECONDS}, default {contract.DEFAULT_DRAIN_GRACE_SECONDS:g})",
    )
    parser.add_argument("--concurrency", type=int, help=f"tasks in flight (env {contract.ENV_CONCURRENCY})")
    parser.add_argument(
        "--http-port", type=int, help=f"env {contract.ENV_HTTP_PORT}, default {contract.HTTP_PORT}"
    )
    parser.add_argument("--http-bind", help=f"env {contract.ENV_HTTP_BIND}, default 0.0.0.0")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(
            drain_grace_seconds=args.drain_grace,
            concurrency=args.concurrency,
            http_port=args.http_port,
            http_bind=args.http_bind,
        )
    except SettingsError as exc:
        print(f"tars-agent: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(
        level=settings.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request is noise
    asyncio.run(_amain(settings))


if __name__ == "__main__":
    main()
