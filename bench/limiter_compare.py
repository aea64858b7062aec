"""The limiters users pick today vs ours, side by side in one run against one strict upstream.

Contenders (each in front of the same mock upstream, bench/README.md says how each is configured):

  openai      the real `openai` client (AsyncOpenAI), its default retries (2, its own backoff,
              Retry-After honoured), no limiter: what most users run
  aiolimiter  aiolimiter.AsyncLimiter, budget / processes per process, in front of that client
  limits      `limits`' MovingWindowRateLimiter on async Redis, one budget for all processes; a
              refused caller sleeps until the window's reset (get_window_stats), then the client
  litellm     LiteLLM's Router, usage-based-routing-v2, deployment rpm shared through Redis
  tars        ours: tars_agent.limiter.SharedLimiter (one Redis budget, Budget.from_rates) in front
              of the project's LLMClient, as an agent runs it

Phases, one after the other, each with a fresh upstream and a flushed Redis:

  grid        for 1, 4, 16, 64 agent OS processes: a fixed number of asyncio callers spread over
              the processes, each pacing its requests so that all offer 2x the budget (closed loop:
              a caller whose call took longer goes again at once); the upstream is a short bucket
              (the budget's per-second rate) that answers 429 + Retry-After beyond it and, by
              default, counts refused requests against the limit like OpenAI
  contended   8 processes x 50 waiters acquiring from a 600/min budget as fast as they are let:
              Redis commands per admission and fairness (Jain over the 400 waiters' admissions)
  decisions   8 processes x 16 callers acquiring from an ample budget as fast as they can
  uncontended one caller acquiring from an ample budget: latency of one acquire

Every process is forked from this one after the libraries are imported (LiteLLM's import alone
takes seconds of CPU). The upstream (python -m tars_agent.mockllm) logs the arrival of every
admitted and refused request; the windows and rates are computed from that log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import datetime as dt
import json
import multiprocessing as mp
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis

from compare_stats import (
    commands_between,
    commandstats_calls,
    jain,
    lateness_ms,
    p99,
    pacing_interval_s,
    pct,
    priority_rows,
    split_evenly,
    worst_window_ratio,
)
from limiter_bench import free_port, machine, redis_server, stop_process, wait_for, wait_until_ready
from limiter_stats import fmt, percentile, render_table
from tars_agent.limiter import Budget, LimiterTimeout, Reservation, SharedLimiter
from tars_agent.llm import LLMClient, LLMConfig, UpstreamError
from tars_agent.tasks import Message, TaskSpec

OUT_DIR = Path(__file__).resolve().parent / "out"
CONTENDERS = ("openai", "aiolimiter", "limits", "litellm", "tars")
WITH_DECISIONS = ("aiolimiter", "limits", "litellm", "tars")  # a limiter to ask without a request
USES_REDIS = frozenset({"limits", "litellm", "tars"})
MODEL = "gpt-4o-mini"
MAX_TOKENS = 16
PRIORITY = "normal"
AMPLE_RPM = 30_000_000  # the largest per-minute budget the GCRA takes (1 unit per microsecond)
OFFERED_FACTOR = 2.0
CONTENDED = (8, 50, 600)  # processes, waiters per process, requests per minute
DECISION_LOAD = (8, 16)  # processes, callers per process
# The priorities phase, ours only (the others have no classes): per process (priority, callers,
# seconds between one caller's starts; 0 = again as soon as admitted). Over 8 processes critical
# offers 1/s, high and normal 3/s each, and low's 80 callers take whatever is left of the 10/s.
PRIORITY_MIX: tuple[tuple[str, int, float], ...] = (
    ("critical", 1, 8.0),
    ("high", 2, 16 / 3),
    ("normal", 2, 16 / 3),
    ("low", 10, 0.0),
)
PRIORITY_LOAD = (8, 600)  # processes, requests per minute
PHASES = ("grid", "contended", "decisions", "uncontended", "priorities")
READY_TIMEOUT_S = 300.0  # 64 LiteLLM routers take a while to build on 2 busy cores
START_MARGIN_S = 0.5
STOP_GRACE_S = 5.0
# No traffic leaves this machine: LiteLLM fetches these from the internet unless told not to.
LITELLM_LOCAL = ("MODEL_COST_MAP", "ANTHROPIC_BETA_HEADERS", "AUTOROUTER_PRESETS", "BLOG_POSTS")


@dataclass(frozen=True)
class Profile:
    process_counts: tuple[int, ...]
    callers: int  # asyncio callers in all, split over the processes
    grid_s: float
    contended_s: float
    decisions_s: float
    uncontended_s: float
    priorities_s: float


PROFILES = {
    "quick": Profile((1, 16), 32, 6.0, 4.0, 2.0, 2.0, 10.0),
    "full": Profile((1, 4, 16, 64), 64, 20.0, 20.0, 5.0, 3.0, 30.0),
}


@dataclass(frozen=True)
class Upstream:
    rpm: int  # the budget
    burst: int  # the upstream bucket, in requests
    latency_s: float
    count_refused: bool

    @property
    def rate_per_s(self) -> float:
        return self.rpm / 60


# -- the contenders, inside a worker process ----------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    contender: str
    index: int
    processes: int
    callers: int  # in this process
    mode: str  # "calls": chat completions against the upstream; "acquire": the limiter alone
    interval_s: float  # between one caller's request starts in "calls"; 0 = as fast as it can
    rpm: int  # the limiter's budget
    llm_url: str
    redis_port: int
    out_path: str
    record_latency: bool
    mix: tuple[tuple[str, int, float], ...] = ()  # the priorities phase: its callers (PRIORITY_MIX)


SLOT_US: contextvars.ContextVar[int | None] = contextvars.ContextVar("slot_us", default=None)


class SlotRecordingLimiter(SharedLimiter):
    """Ours, noting the reserved start (Reservation.slot_us, on Redis' clock) for the request that
    follows in the same task."""

    async def acquire(self, priority: str, tokens: int, timeout_s: float) -> Reservation:
        reservation = await super().acquire(priority, tokens, timeout_s)
        SLOT_US.set(reservation.slot_us)
        return reservation


class LatenessTransport(httpx.AsyncBaseTransport):
    """The real transport; pairs each request's start with the slot reserved for it."""

    def __init__(self, inner: httpx.AsyncBaseTransport, sink: list[tuple[int, int]]) -> None:
        self._inner = inner
        self._sink = sink

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        slot = SLOT_US.get()
        if slot is not None:
            self._sink.append((time.time_ns() // 1000, slot))
            SLOT_US.set(None)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def messages(caller: int, seq: int) -> list[dict[str, str]]:
    # distinct prompts: nothing may coalesce or cache identical requests
    return [{"role": "user", "content": f"benchmark request {caller}-{seq}: answer in one line"}]


class Contender:
    """One library's way to make a rate-limited call, and its limiter alone where it has one."""

    failures: tuple[type[BaseException], ...] = ()  # a failed call: the caller tries again at once

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.slots: list[tuple[int, int]] = []  # (actual start us, reserved slot us)
        # ours: acquires, those spent from a lease, and the leases' admissions granted and lost
        self.leases: Counter[str] = Counter()

    async def setup(self) -> None:
        """Connect and warm up before the clock starts."""

    async def call(self, caller: int, seq: int) -> None:
        raise NotImplementedError

    async def acquire(self, priority: str) -> None:
        """Wait for one admission; `priority` counts only where the limiter has classes (ours)."""
        raise NotImplementedError(f"{self.spec.contender} has no limiter to ask")

    async def close(self) -> None:
        """Close what setup opened."""


class OpenAIClient(Contender):
    """The plain client with its default retries, no limiter."""

    async def setup(self) -> None:
        import openai

        self.failures = (openai.APIError,)
        self.client = openai.AsyncOpenAI(base_url=self.spec.llm_url, api_key="bench")
        if self.spec.mode == "calls":  # the SDK loads its modules on first use: not on the clock
            await self.create(-1, 0)

    async def create(self, caller: int, seq: int) -> None:
        await self.client.chat.completions.create(
            model=MODEL,
            messages=messages(caller, seq),
            max_tokens=MAX_TOKENS,
        )

    async def call(self, caller: int, seq: int) -> None:
        await self.create(caller, seq)

    async def close(self) -> None:
        await self.client.close()


class AioLimiter(OpenAIClient):
    """aiolimiter: each process gets budget / processes for the minute, the way its docs show."""

    async def setup(self) -> None:
        from aiolimiter import AsyncLimiter

        await super().setup()
        self.limiter = AsyncLimiter(self.spec.rpm / self.spec.processes, 60)

    async def acquire(self, priority: str) -> None:
        await self.limiter.acquire()

    async def call(self, caller: int, seq: int) -> None:
        await self.acquire(PRIORITY)
        await self.create(caller, seq)


class LimitsMovingWindow(OpenAIClient):
    """limits: one moving window in Redis for all processes; refused -> sleep to the window's reset."""

    async def setup(self) -> None:
        from limits import RateLimitItemPerMinute
        from limits.aio.strategies import MovingWindowRateLimiter
        from limits.storage import storage_from_string

        await super().setup()
        self.storage = storage_from_string(f"async+redis://127.0.0.1:{self.spec.redis_port}")
        self.limiter = MovingWindowRateLimiter(self.storage)
        self.item = RateLimitItemPerMinute(self.spec.rpm)
        await self.storage.check()

    async def acquire(self, priority: str) -> None:
        while not await self.limiter.hit(self.item, "bench"):
            stats = await self.limiter.get_window_stats(self.item, "bench")
            await asyncio.sleep(max(stats.reset_time - time.time(), 0.001))

    async def call(self, caller: int, seq: int) -> None:
        await self.acquire(PRIORITY)
        await self.create(caller, seq)


class LiteLLMRouter(Contender):
    """LiteLLM's Router: rpm per deployment, counted in Redis by usage-based-routing-v2; a call over
    the limit raises RateLimitError with retry-after 60 (the minute window): the caller sleeps to
    the next minute. The Router retries upstream 429s itself (its defaults)."""

    async def setup(self) -> None:
        import litellm
        from litellm import Router

        self.failures = (litellm.exceptions.APIError, litellm.exceptions.RateLimitError)
        self.router = Router(
            model_list=[
                {
                    "model_name": MODEL,
                    "litellm_params": {
                        "model": f"openai/{MODEL}",
                        "api_base": self.spec.llm_url,
                        "api_key": "bench",
                        "rpm": self.spec.rpm,
                    },
                }
            ],
            routing_strategy="usage-based-routing-v2",
            redis_host="127.0.0.1",
            redis_port=self.spec.redis_port,
        )
        # the first calls load half of LiteLLM: not on the clock (Redis is flushed after; the
        # Router's in-process count of this minute keeps these one or two)
        await self.router.acompletion(model=MODEL, messages=messages(-1, 0), mock_response="ok")
        if self.spec.mode == "calls":
            await self.router.acompletion(model=MODEL, messages=messages(-1, 1), max_tokens=MAX_TOKENS)

    async def routed(self, caller: int, seq: int, mock: bool) -> None:
        import litellm

        extra: dict[str, Any] = {"mock_response": "ok"} if mock else {}
        while True:
            try:
                await self.router.acompletion(
                    model=MODEL, messages=messages(caller, seq), max_tokens=MAX_TOKENS, **extra
                )
                return
            except litellm.exceptions.RateLimitError as exc:
                if "rpm limit" not in str(exc) and "No deployments available" not in str(exc):
                    raise  # the upstream's 429 after the Router's retries: a failed call
                now = time.time()
                await asyncio.sleep(60 - now % 60 + 0.01)  # the Router's own limit: next minute

    async def call(self, caller: int, seq: int) -> None:
        await self.routed(caller, seq, mock=False)

    async def acquire(self, priority: str) -> None:
        await self.routed(0, 0, mock=True)  # the routing decision and its counters, no HTTP


class Tars(Contender):
    """Ours: the shared limiter in front of the project's LLM client, as an agent runs it."""

    failures = (UpstreamError, LimiterTimeout)

    async def setup(self) -> None:
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # the agent's limiter connection (worker.py): short timeouts, no retries
        self.conn = aioredis.Redis(
            port=self.spec.redis_port,
            decode_responses=True,
            socket_timeout=0.25,
            socket_connect_timeout=0.25,
            retry=Retry(NoBackoff(), 0),
        )
        budget = Budget.from_rates("bench", requests_per_minute=self.spec.rpm)
        self.limiter = SlotRecordingLimiter(self.conn, budget)
        config = LLMConfig(base_url=self.spec.llm_url)
        # httpx ignores `limits` when given a transport, so the pool sizes go to the inner one
        inner = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(
                max_connections=config.max_connections, max_keepalive_connections=config.max_keepalive
            )
        )
        self.client = LLMClient(config, limiter=self.limiter, transport=LatenessTransport(inner, self.slots))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:  # the agent's 250 ms timeout is short for a connect on a loaded machine
            try:
                await self.conn.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise

    async def call(self, caller: int, seq: int) -> None:
        spec = TaskSpec(
            messages=[Message(role="user", content=messages(caller, seq)[0]["content"])],
            max_tokens=MAX_TOKENS,
        )

        async def discard(_text: str) -> None:
            return None

        await self.client.complete(spec, PRIORITY, discard, time.monotonic() + 300)

    async def acquire(self, priority: str) -> None:
        reservation = await self.limiter.acquire(priority, 0, 3600)
        self.slots.append((time.time_ns() // 1000, reservation.slot_us))
        self.leases["acquired"] += 1
        self.leases["leased"] += getattr(reservation, "leased", False)  # a limiter before leases: none

    async def close(self) -> None:
        await self.client.aclose()
        await self.limiter.aclose()  # the give-backs of cancelled callers reach Redis first
        await self.conn.aclose()
        stats = getattr(self.limiter, "lease_stats", None)
        if stats is not None:
            self.leases.update(granted=stats.granted, lost=stats.lost)


CONTENDER_CLASSES: dict[str, type[Contender]] = {
    "openai": OpenAIClient,
    "aiolimiter": AioLimiter,
    "limits": LimitsMovingWindow,
    "litellm": LiteLLMRouter,
    "tars": Tars,
}


async def sleep_until(wall: float) -> None:
    await asyncio.sleep(max(wall - time.time(), 0.0))


@dataclass(frozen=True)
class Caller:
    priority: str
    interval_s: float  # between its starts; 0 = again at once
    offset_s: float  # its first start after the common instant


def callers_of(spec: WorkerSpec) -> list[Caller]:
    """This process's callers: the phase's mix, or `spec.callers` alike. The callers of one class
    are spread over its interval across all processes, so that they do not start together."""
    if not spec.mix:
        return [Caller(PRIORITY, spec.interval_s, 0.0) for _ in range(spec.callers)]
    out = []
    for priority, n, interval_s in spec.mix:
        for k in range(n):
            out.append(
                Caller(
                    priority,
                    interval_s,
                    interval_s * (k * spec.processes + spec.index) / (n * spec.processes),
                )
            )
    return out


async def caller_loop(
    contender: Contender,
    caller: int,
    who: Caller,
    spec: WorkerSpec,
    t0: float,
    end: float,
    done: list[int],
    latencies: list[tuple[str, float]],
    errors: Counter[str],
) -> None:
    """One caller: a request (or an admission) at a time until cancelled."""
    next_start = t0 + who.offset_s
    seq = 0
    while True:
        await sleep_until(next_start)
        started = time.time()
        began = time.perf_counter()
        if spec.mode == "acquire":
            await contender.acquire(who.priority)
        else:
            while True:
                try:
                    await contender.call(caller, seq)
                    break
                except contender.failures as exc:  # what an agent does: requeue, take it again
                    errors[type(exc).__name__] += 1
        if time.time() < end:
            done[caller] += 1
            if spec.record_latency:
                latencies.append((who.priority, (time.perf_counter() - began) * 1000))
        seq += 1
        next_start = started + who.interval_s


async def run_worker(spec: WorkerSpec, ready: Queue[int], start: Queue[tuple[float, float]]) -> None:
    contender = CONTENDER_CLASSES[spec.contender](spec)
    await contender.setup()
    ready.put(spec.index)
    t0, end = await asyncio.to_thread(start.get, True, READY_TIMEOUT_S)
    callers = callers_of(spec)
    done = [0] * len(callers)
    latencies: list[tuple[str, float]] = []
    errors: Counter[str] = Counter()
    await sleep_until(t0)
    cpu_at_start = time.process_time()
    tasks = [
        asyncio.create_task(caller_loop(contender, i, who, spec, t0, end, done, latencies, errors))
        for i, who in enumerate(callers)
    ]
    finished, _ = await asyncio.wait(tasks, timeout=max(end - time.time(), 0.0))
    cpu_s = time.process_time() - cpu_at_start  # this process's CPU (user + system) while measured
    for task in finished:
        task.result()  # a caller only ends by raising: surface it
    for task in tasks:
        task.cancel()
    _, stuck = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
    with contextlib.suppress(Exception):  # closing is best effort: the numbers are taken
        await asyncio.wait_for(contender.close(), STOP_GRACE_S)
    result = {
        "done": done,
        "priorities": [who.priority for who in callers],
        "latencies_ms": latencies,
        "slots": contender.slots,
        "leases": dict(contender.leases),
        "errors": dict(errors),
        "stuck": len(stuck),
        "cpu_s": cpu_s,
    }
    # written before the loop shuts down: a task that ignored its cancellation may hold that up
    await asyncio.to_thread(Path(spec.out_path).write_text, json.dumps(result))


def worker_process(spec: WorkerSpec, ready: Queue[int], start: Queue[tuple[float, float]]) -> None:
    # what the cancellation at the end leaves behind (LiteLLM's inner coroutines) is no news
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
    try:
        asyncio.run(run_worker(spec, ready, start))
    except BaseException:
        traceback.print_exc()  # os._exit below would swallow it
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if Path(spec.out_path).exists() else 1)  # nothing left behind may hold the exit


# -- the harness ------------------------------------------------------------------------------


@contextlib.contextmanager
def mock_upstream(up: Upstream, workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The project's mock: a bucket of `burst` refilling at the budget's per-second rate."""
    port = free_port()
    args = [sys.executable, "-m", "tars_agent.mockllm", "--port", str(port)]
    args += ["--requests-per-minute", str(up.burst), "--window-seconds", str(up.burst / up.rate_per_s)]
    args += ["--latency", str(up.latency_s), "--response-tokens", str(MAX_TOKENS)]
    if up.count_refused:
        args.append("--count-refused")
    log_path = workdir / "mock.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for(lambda: httpx.get(f"{base}/admin/log", timeout=1).status_code == 200, "the mock")
        except RuntimeError:
            print(log_path.read_text(errors="replace"), file=sys.stderr)
            raise
        yield base, proc
    finally:
        stop_process(proc)


@dataclass(frozen=True)
class Infra:
    mock_base: str
    rds: redis.Redis
    redis_port: int
    tmp: Path


def run_processes(
    infra: Infra,
    contender: str,
    processes: int,
    callers: int,
    mode: str,
    interval_s: float,
    rpm: int,
    duration_s: float,
    record_latency: bool = False,
    mix: tuple[tuple[str, int, float], ...] = (),
) -> dict[str, Any]:
    """Fork the workers, start them at one instant once all are ready, collect what they saw."""
    ctx = mp.get_context("fork")  # the libraries are imported once, here, not in every worker
    ready: Queue[int] = ctx.Queue()
    start: Queue[tuple[float, float]] = ctx.Queue()
    tag = f"{contender}-{mode}-{processes}-{time.monotonic_ns()}"
    specs = [
        WorkerSpec(
            contender=contender,
            index=i,
            processes=processes,
            callers=n,
            mode=mode,
            interval_s=interval_s,
            rpm=rpm,
            llm_url=f"{infra.mock_base}/v1",
            redis_port=infra.redis_port,
            out_path=str(infra.tmp / f"{tag}-{i}.json"),
            record_latency=record_latency,
            mix=mix,
        )
        for i, n in enumerate(split_evenly(callers, processes))
    ]
    procs = [ctx.Process(target=worker_process, args=(s, ready, start), daemon=True) for s in specs]
    began = time.monotonic()
    for p in procs:
        p.start()
    try:
        wait_until_ready(procs, ready, READY_TIMEOUT_S, tag)
        setup_s = time.monotonic() - began
        # warm-ups and connections are not counted: fresh upstream, empty Redis, zeroed counters
        httpx.post(f"{infra.mock_base}/admin/reset", timeout=10).raise_for_status()
        # keys only: FLUSHALL also drops the scripts the libraries loaded, and not all reload them
        stale = list(infra.rds.scan_iter(count=1000))
        if stale:
            infra.rds.delete(*stale)
        infra.rds.config_resetstat()
        redis_cpu_before = redis_cpu_s(infra.rds)
        t0 = time.time() + START_MARGIN_S
        for _ in procs:
            start.put((t0, t0 + duration_s))
        for p in procs:
            p.join(timeout=duration_s + START_MARGIN_S + 2 * STOP_GRACE_S + 30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if not all(Path(s.out_path).exists() for s in specs):
        raise RuntimeError(f"{tag}: a worker failed (exit codes {[p.exitcode for p in procs]})")
    results = [json.loads(Path(s.out_path).read_text()) for s in specs]
    commands = commands_between({}, commandstats_calls(infra.rds.info("commandstats")))
    redis_cpu = redis_cpu_s(infra.rds) - redis_cpu_before
    log = httpx.get(f"{infra.mock_base}/admin/log", timeout=30).json() if mode == "calls" else None
    done = [n for r in results for n in r["done"]]
    errors: Counter[str] = Counter()
    leases: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
        leases.update(r["leases"])
    return {
        "t0": t0,
        "duration_s": duration_s,
        "setup_s": setup_s,
        "done": done,
        "done_by_priority": [
            (p, n) for r in results for p, n in zip(r["priorities"], r["done"], strict=True)
        ],
        "latencies_ms": [ms for r in results for _p, ms in r["latencies_ms"]],
        "waits_by_priority": [(p, ms) for r in results for p, ms in r["latencies_ms"]],
        "slots": [tuple(s) for r in results for s in r["slots"]],
        "errors": dict(errors),
        "leases": dict(leases),
        "stuck": sum(r["stuck"] for r in results),
        "redis_commands": commands,
        "cpu_s": sum(r["cpu_s"] for r in results),
        "redis_cpu_s": redis_cpu,
        "log": log,
    }


def redis_cpu_s(rds: redis.Redis) -> float:
    """The Redis server's CPU so far (user + system, all its threads), seconds."""
    info = rds.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def grid_row(contender: str, processes: int, up: Upstream, run: dict[str, Any]) -> dict[str, Any]:
    """One contender at one process count, from the upstream's log (arrivals in [t0, t0 + D))."""
    t0, duration = run["t0"], run["duration_s"]
    log = run["log"]
    admitted = [e["ts"] for e in log["admitted"] if t0 <= e["ts"] < t0 + duration]
    refused = [e["ts"] for e in log["refused"] if t0 <= e["ts"] < t0 + duration]
    sent = admitted + refused
    lateness = lateness_ms(run["slots"])
    uses_redis = contender in USES_REDIS
    return {
        "contender": contender,
        "processes": processes,
        "sent": len(sent),
        "admitted": len(admitted),
        "refused": len(refused),
        "rate_429_pct": pct(len(refused), len(sent)),
        "goodput_pct": pct(len(admitted), up.rate_per_s * duration),
        # the limit over a window: the per-second rate, the per-minute budget
        "peak_sent_1s": worst_window_ratio(sent, 1.0, up.rate_per_s),
        "peak_sent_60s": worst_window_ratio(sent, 60.0, up.rpm),
        "peak_admitted_1s": worst_window_ratio(admitted, 1.0, up.rate_per_s),
        "jain": jain(run["done"]),
        "callers_starved": sum(1 for n in run["done"] if n == 0),
        "lateness_p99_ms": p99(lateness) if lateness else None,
        "redis_commands": run["redis_commands"] if uses_redis else None,
        "commands_per_admitted": (run["redis_commands"] / len(admitted) if admitted else None)
        if uses_redis
        else None,
        "failed_calls": run["errors"],
        "stuck": run["stuck"],
        "setup_s": run["setup_s"],
    }


def phase_row(contender: str, run: dict[str, Any]) -> dict[str, Any]:
    admitted = sum(run["done"])
    lateness = lateness_ms(run["slots"])
    return {
        "contender": contender,
        "admitted": admitted,
        "per_s": admitted / run["duration_s"],
        "jain": jain(run["done"]),
        "callers_starved": sum(1 for n in run["done"] if n == 0),
        "redis_commands": run["redis_commands"] if contender in USES_REDIS else None,
        "commands_per_admitted": run["redis_commands"] / admitted
        if admitted and contender in USES_REDIS
        else None,
        # CPU per admission: the worker processes' while measured (the harness's caller loop
        # included), Redis' over the whole run (its idle margins add little)
        "cpu_us_per_decision": run["cpu_s"] / admitted * 1e6 if admitted else None,
        "redis_cpu_us_per_decision": run["redis_cpu_s"] / admitted * 1e6
        if admitted and contender in USES_REDIS
        else None,
        "p50_ms": percentile(run["latencies_ms"], 50),
        "p99_ms": percentile(run["latencies_ms"], 99),
        "lateness_p99_ms": p99(lateness) if lateness else None,
        # ours: the acquires served from a lease, and the leases' admissions never spent
        "leased_pct": pct(run["leases"].get("leased", 0), run["leases"].get("acquired", 0)),
        "lease_lost_pct": pct(run["leases"].get("lost", 0), run["leases"].get("granted", 0)),
        "stuck": run["stuck"],
    }


# -- report -----------------------------------------------------------------------------------


def grid_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["contender", "procs", "sent", "429 %", "goodput %", "peak 1s", "peak 60s", "Jain"]
    header += ["starved", "p99 late ms", "cmds/adm", "failed calls"]
    body = [
        [
            r["contender"],
            str(r["processes"]),
            str(r["sent"]),
            fmt(r["rate_429_pct"]),
            fmt(r["goodput_pct"]),
            fmt(r["peak_sent_1s"], 2),
            fmt(r["peak_sent_60s"], 2),
            fmt(r["jain"], 2),
            str(r["callers_starved"]),
            fmt(r["lateness_p99_ms"]),
            fmt(r["commands_per_admitted"]),
            str(sum(r["failed_calls"].values())),
        ]
        for r in rows
    ]
    return render_table(header, body)


def phases_table(phases: dict[str, dict[str, dict[str, Any]]]) -> str:
    header = ["contender", "decisions/s", "cpu us/dec", "redis us/dec", "uncont. p50 ms", "p99 ms"]
    header += ["contended adm/s", "cmds/adm", "Jain", "starved", "p99 late ms", "leased %", "lost %"]
    body = []
    for name in sorted({c for rows in phases.values() for c in rows}, key=CONTENDERS.index):
        dec = phases["decisions"].get(name, {})
        unc = phases["uncontended"].get(name, {})
        con = phases["contended"].get(name, {})
        body.append(
            [
                name,
                fmt(dec.get("per_s"), 0),
                fmt(dec.get("cpu_us_per_decision")),
                fmt(dec.get("redis_cpu_us_per_decision")),
                fmt(unc.get("p50_ms"), 2),
                fmt(unc.get("p99_ms"), 2),
                fmt(con.get("per_s"), 2),
                fmt(con.get("commands_per_admitted")),
                fmt(con.get("jain"), 2),
                str(con.get("callers_starved", "n/a")),
                fmt(con.get("lateness_p99_ms")),
                fmt(dec.get("leased_pct")),
                fmt(dec.get("lease_lost_pct")),
            ]
        )
    return render_table(header, body)


def priorities_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["priority", "callers", "offered/s", "admitted/s", "wait p50 ms", "p99 ms", "max ms"]
    body = [
        [
            r["priority"],
            str(r["callers"]),
            fmt(r["offered_per_s"], 2) if r["offered_per_s"] is not None else "saturating",
            fmt(r["admitted_per_s"], 2),
            fmt(r["wait_p50_ms"]),
            fmt(r["wait_p99_ms"]),
            fmt(r["wait_max_ms"]),
        ]
        for r in rows
    ]
    return render_table(header, body)


def plot(
    path: Path,
    rows: Sequence[dict[str, Any]],
    phases: dict[str, dict[str, dict[str, Any]]],
    priorities: Sequence[dict[str, Any]] = (),
) -> bool:
    try:  # optional: the tables and the JSON do not need it
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    panels = [
        ("rate_429_pct", "upstream 429s, % of requests sent", "linear"),
        ("goodput_pct", "goodput, % of the budget", "linear"),
        ("jain", "Jain fairness among equal callers", "linear"),
        ("commands_per_admitted", "Redis commands per admitted request", "log"),
    ]
    names = [c for c in CONTENDERS if any(r["contender"] == c for r in rows)]
    for ax, (key, title, scale) in zip(axes.flat, panels, strict=False):
        for name in names:
            points = sorted(
                (r["processes"], r[key]) for r in rows if r["contender"] == name and r[key] is not None
            )
            if points:  # one colour per contender in every panel
                ax.plot(
                    *zip(*points, strict=True), marker="o", label=name, color=f"C{CONTENDERS.index(name)}"
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale(scale)
        ax.set_xlabel("agent processes")
        ax.set_title(title, fontsize="medium")
        ax.grid(alpha=0.3)
    axes.flat[1].axhline(100, color="black", linestyle="--", linewidth=0.8)
    if rows:
        axes.flat[0].legend(fontsize="small")
    bars = [
        ("decisions", "per_s", "decisions/s, 8 processes, ample budget"),
        ("contended", "commands_per_admitted", "contended (8 x 50 waiters): commands/admitted"),
    ]
    for ax, (phase, key, title) in zip(axes.flat[4:6], bars, strict=True):
        items = [(n, phases[phase][n][key]) for n in names if n in phases[phase]]
        items = [(n, v) for n, v in items if v]
        if items:
            ax.bar([n for n, _ in items], [v for _, v in items], color="tab:gray")
        ax.set_yscale("log")
        ax.set_title(title, fontsize="medium")
        ax.grid(alpha=0.3, axis="y")
    ax_wait, ax_rate = axes.flat[6], axes.flat[7]
    if priorities:
        classes = [r["priority"] for r in priorities]
        ax_wait.bar(classes, [r["wait_p99_ms"] or 0 for r in priorities], color="tab:gray")
        ax_wait.axhline(1000, color="black", linestyle="--", linewidth=0.8)  # issue 9: critical <= 1 s
        ax_rate.bar(classes, [r["admitted_per_s"] for r in priorities], color="C4", label="admitted")
        ax_rate.scatter(
            [c for c, r in zip(classes, priorities, strict=True) if r["offered_per_s"] is not None],
            [r["offered_per_s"] for r in priorities if r["offered_per_s"] is not None],
            color="black",
            marker="_",
            s=400,
            label="offered",
        )
        ax_rate.legend(fontsize="small")
    ax_wait.set_yscale("log")
    ax_wait.set_title("ours, low saturating: wait p99 ms per class", fontsize="medium")
    ax_rate.set_title("ours, low saturating: admitted/s per class (10/s budget)", fontsize="medium")
    for ax in (ax_wait, ax_rate):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -- main -------------------------------------------------------------------------------------


def import_libraries(contenders: Sequence[str]) -> None:
    """Import what the workers need before forking them (each would pay for it again)."""
    for name in LITELLM_LOCAL:
        os.environ[f"LITELLM_LOCAL_{name}"] = "True"
    os.environ["LITELLM_DISABLE_LAZY_LOADING"] = "1"  # load it once here, not in every worker
    wanted = {"openai": ["openai"], "aiolimiter": ["openai", "aiolimiter"], "litellm": ["litellm"]}
    wanted["limits"] = ["openai", "limits.aio.strategies", "coredis"]
    for contender in contenders:
        for module in wanted.get(contender, []):
            __import__(module)
    if {"openai", "aiolimiter", "limits"} & set(contenders):
        import openai

        # the SDK imports its resources on first use: once here, not in every worker
        _ = openai.AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="unused").chat.completions


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (~2 min, noisy numbers)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated")
    parser.add_argument("--processes", help="comma-separated process counts (default: the profile's)")
    parser.add_argument("--rpm", type=int, default=600, help="the budget, requests per minute")
    parser.add_argument(
        "--upstream-burst", type=int, help="the upstream bucket in requests (default: one second's worth)"
    )
    parser.add_argument("--latency", type=float, default=0.05, help="upstream seconds per request")
    parser.add_argument(
        "--no-count-refused",
        action="store_true",
        help="refused requests do not use the upstream's limit (default: they do, like OpenAI)",
    )
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument(
        "--from-json", type=Path, help="print the tables and draw the PNG of an earlier (or cut) run's JSON"
    )
    args = parser.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if not args.contenders or set(args.contenders) - set(CONTENDERS):
        parser.error(f"--contenders: choose from {', '.join(CONTENDERS)}")
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if set(args.phases) - set(PHASES):
        parser.error(f"--phases: choose from {', '.join(PHASES)}")
    return args


def render(
    rows: Sequence[dict[str, Any]],
    phases: dict[str, dict[str, dict[str, Any]]],
    priorities: Sequence[dict[str, Any]],
    png: Path,
) -> None:
    print()
    if rows:
        print(grid_table(rows))
        print()
    if any(phases.values()):
        print(phases_table(phases))
        print()
    if priorities:
        print(priorities_table(priorities))
    print(f"plot: {png}" if plot(png, rows, phases, priorities) else "plot: skipped (no matplotlib)")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print(f"command: {saved['command']}\nfinished: {saved['finished']}, wall {saved['wall_s']:.0f} s")
        render(
            saved["grid"], saved["phases"], saved.get("priorities", []), args.from_json.with_suffix(".png")
        )
        return
    profile = PROFILES["quick" if args.quick else "full"]
    counts = tuple(int(n) for n in args.processes.split(",")) if args.processes else profile.process_counts
    rate = args.rpm / 60
    burst = args.upstream_burst or max(round(rate), 1)
    up = Upstream(args.rpm, burst, args.latency, count_refused=not args.no_count_refused)
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))  # stop redis and the mock too
    info = machine()
    command = shlex.join([sys.executable, *sys.argv])
    started = time.monotonic()
    print(f"command: {command}")
    print(f"date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"machine: nproc={info['nproc']} ({info['cpu_model'] or 'unknown CPU'}), "
        f"Python {info['python']}, {info['platform']}; load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"upstream: budget {up.rpm}/min ({rate:g}/s), bucket {up.burst} refilling at {rate:g}/s, "
        f"latency {up.latency_s:g} s, refused requests {'count' if up.count_refused else 'do not count'}"
    )
    interval = pacing_interval_s(profile.callers, rate, OFFERED_FACTOR)
    print(
        f"grid: {profile.callers} callers over {', '.join(map(str, counts))} processes, each starting a "
        f"request every {interval:.2f} s ({OFFERED_FACTOR:g}x the budget), {profile.grid_s:g} s each",
        flush=True,
    )
    import_libraries(args.contenders)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    phases: dict[str, dict[str, dict[str, Any]]] = {"contended": {}, "decisions": {}, "uncontended": {}}
    priorities: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "command": command,
        "machine": info,
        "upstream": asdict(up),
        "profile": asdict(profile) | {"process_counts": counts},
        "grid": rows,
        "phases": phases,
        "priorities": priorities,
    }
    json_path = out_dir / "limiter_compare.json"

    def save() -> None:  # after every run: a run cut short keeps what it measured
        report["wall_s"] = time.monotonic() - started
        report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        json_path.write_text(json.dumps(report, indent=1))

    with tempfile.TemporaryDirectory(prefix="tars-compare-") as tmp_name:
        tmp = Path(tmp_name)
        with redis_server(tmp) as (rds, redis_url), mock_upstream(up, tmp) as (mock_base, _mock):
            infra = Infra(mock_base, rds, int(redis_url.rsplit(":", 1)[1].split("/")[0]), tmp)
            # the short phases first, the grid's largest process count last
            limiters = [c for c in args.contenders if c in WITH_DECISIONS]
            (c_procs, c_waiters, c_rpm), (d_procs, d_callers) = CONTENDED, DECISION_LOAD
            loads = {  # processes, callers in all, budget per minute, seconds
                "contended": (c_procs, c_procs * c_waiters, c_rpm, profile.contended_s),
                "decisions": (d_procs, d_procs * d_callers, AMPLE_RPM, profile.decisions_s),
                "uncontended": (1, 1, AMPLE_RPM, profile.uncontended_s),
            }
            for phase, (processes, callers, rpm, seconds) in loads.items():
                if phase not in args.phases:
                    continue
                for name in limiters:
                    run = run_processes(
                        infra, name, processes, callers, "acquire", 0.0, rpm, seconds, phase == "uncontended"
                    )
                    phases[phase][name] = phase_row(name, run)
                    save()
                    print(f"  {phase:11} {name:10} {fmt(phases[phase][name]['per_s'], 1)}/s", flush=True)
            if "priorities" in args.phases and "tars" in args.contenders:
                p_procs, p_rpm = PRIORITY_LOAD
                per_process = sum(n for _p, n, _i in PRIORITY_MIX)
                run = run_processes(
                    infra,
                    "tars",
                    p_procs,
                    p_procs * per_process,
                    "acquire",
                    0.0,
                    p_rpm,
                    profile.priorities_s,
                    record_latency=True,
                    mix=PRIORITY_MIX,
                )
                priorities[:] = priority_rows(
                    PRIORITY_MIX,
                    p_procs,
                    run["duration_s"],
                    run["done_by_priority"],
                    run["waits_by_priority"],
                )
                save()
                print(
                    "  priorities tars "
                    + ", ".join(f"{r['priority']} p99 {fmt(r['wait_p99_ms'])} ms" for r in priorities),
                    flush=True,
                )
            if "grid" in args.phases:
                for processes in counts:
                    for name in args.contenders:
                        run = run_processes(
                            infra, name, processes, profile.callers, "calls", interval, up.rpm, profile.grid_s
                        )
                        rows.append(grid_row(name, processes, up, run))
                        save()
                        r = rows[-1]
                        print(
                            f"  {name:10} x{processes:<3} 429 {fmt(r['rate_429_pct'])} %, goodput "
                            f"{fmt(r['goodput_pct'])} %, Jain {fmt(r['jain'], 2)} "
                            f"(setup {r['setup_s']:.1f} s)",
                            flush=True,
                        )
    save()
    render(rows, phases, priorities, json_path.with_suffix(".png"))
    print(f"wall: {report['wall_s']:.0f} s\njson: {json_path}")


if __name__ == "__main__":
    main()
