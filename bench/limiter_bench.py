"""Shared limiter vs naive retry: a pool of agent processes against one rate-limited LLM upstream.

One invocation runs every scenario one after the other against the same upstream (the project's
mock, tars_agent.mockllm, in its own process) and the same real redis-server (started here on a
free port in a temp dir), with the same offered load, so the ratios between scenarios come from one
run on one (noisy) machine:

  naive           each process calls the upstream through the project's LLM client with no limiter:
                  exponential backoff with full jitter, Retry-After as the minimum (the common client)
  shared-limiter  the same client, every attempt first waits at the shared limiter (one Redis budget
                  configured to the upstream's limits, as an agent configured by the operator)
  local-limiter   the same, but each process has its own bucket holding budget / pool size
                  (the degraded-mode split, tars_agent.limiter.local_share): no shared view

Each scenario: P processes x C asyncio agents in a closed loop (one task at a time each, retried
until it completes, as the agent requeues a failed task). The first seconds are warm-up and are
not measured. See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from limiter_stats import fmt, in_window, peak_in_window, per_second, percentile, ratio, render_table
from tars_agent.circuit import CircuitOpenError
from tars_agent.limiter import Budget, LimiterTimeout, SharedLimiter, local_share
from tars_agent.llm import LLMClient, LLMConfig, UpstreamError, estimate_prompt_tokens
from tars_agent.metrics import AgentMetrics
from tars_agent.tasks import Message, TaskSpec
from tars_contract import metric_names

REDIS_SERVER = "/usr/bin/redis-server"
OUT_DIR = Path(__file__).resolve().parent / "out"
SCENARIOS = ("naive", "shared-limiter", "local-limiter")
LIMITER_OF = {"naive": "none", "shared-limiter": "shared", "local-limiter": "local"}
# (warm-up s, measured s) per profile; three scenarios plus ~2 s start-up each
PROFILES = {"quick": (3.0, 6.0), "default": (10.0, 45.0), "full": (20.0, 120.0)}
PROMPT = "Summarise the benchmark request in one line."
PRIORITY = "normal"  # the default priority of a submitted task
TASK_TIMEOUT_S = 300.0  # the agent's default TARS_TASK_TIMEOUT_SECONDS
RESPONSE_TOKENS = 16  # words the mock answers with
READY_TIMEOUT_S = 60.0
START_MARGIN_S = 0.5  # between "all processes ready" and the common start instant
JOIN_TIMEOUT_S = 30.0
CANCEL_ROUNDS = 20  # 0.5 s apart


@dataclass(frozen=True)
class BenchConfig:
    processes: int
    concurrency: int  # asyncio agents per process
    rate: int  # upstream requests per second
    upstream_burst: int  # the upstream bucket's size in requests
    latency_s: float
    max_tokens: int
    tokens_bind: bool  # tokens per minute binds (at half the request rate) instead of requests
    burst_fraction: float | None  # the limiter's burst, as TARS_BURST_FRACTION (None: the agent's default)
    local_pool_size: int  # what each process divides the budget by in local-limiter
    warmup_s: float
    measure_s: float
    scenarios: tuple[str, ...]
    out_dir: str

    @property
    def window_s(self) -> float:
        """The mock's refill window: a bucket of `upstream_burst` refilling at `rate` per second."""
        return self.upstream_burst / self.rate

    @property
    def cost_tokens(self) -> int:
        """Tokens one request costs upstream: the prompt estimate plus max_tokens, charged up front."""
        return estimate_prompt_tokens(task_spec(self.max_tokens)) + self.max_tokens

    @property
    def tokens_per_s(self) -> int:
        # binding: half the request rate; otherwise ten times what the request limit lets through
        share = 0.5 if self.tokens_bind else 10.0
        return math.ceil(self.rate * self.cost_tokens * share)

    @property
    def allowed_per_s(self) -> float:
        """Requests per second the upstream allows in the long run (the tighter of its two limits)."""
        return min(float(self.rate), self.tokens_per_s / self.cost_tokens)


def task_spec(max_tokens: int) -> TaskSpec:
    # Streamed like the agent's default task; every request costs the same, so tokens and
    # requests limits translate into each other exactly.
    return TaskSpec(messages=[Message(role="user", content=PROMPT)], max_tokens=max_tokens, stream=True)


# -- worker processes ------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    limiter: str  # none | shared | local
    llm_url: str
    redis_url: str
    out_path: str
    config: BenchConfig


@dataclass
class Recorder:
    responses: list[tuple[float, int]] = field(default_factory=list)  # (wall time, HTTP status)
    completions: list[tuple[float, float, int]] = field(default_factory=list)  # (start, end, failed calls)
    failures: list[tuple[float, str]] = field(default_factory=list)  # calls the client gave up on
    current: dict[int, float] = field(default_factory=dict)  # agent -> start of its unfinished task


class RecordingTransport(httpx.AsyncBaseTransport):
    """The real transport, noting the time and status of every upstream response (429s included)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, recorder: Recorder) -> None:
        self._inner = inner
        self._recorder = recorder

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        self._recorder.responses.append((time.time(), response.status_code))
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def make_limiter(
    spec: WorkerSpec, metrics: AgentMetrics
) -> tuple[SharedLimiter | None, aioredis.Redis | None]:
    cfg = spec.config
    if spec.limiter == "none":
        return None, None
    # The agent's limiter connection (worker.py): short timeouts, no retries.
    conn = aioredis.Redis.from_url(
        spec.redis_url,
        decode_responses=True,
        socket_timeout=0.25,
        socket_connect_timeout=0.25,
        retry=Retry(NoBackoff(), 0),
    )
    budget = Budget.from_rates(
        "bench",
        requests_per_minute=cfg.rate * 60,
        tokens_per_minute=cfg.tokens_per_s * 60,
        burst_fraction=cfg.burst_fraction,
    )
    if spec.limiter == "local":
        # own key per process: the same GCRA, but no process sees what the others spend
        budget = Budget(f"bench-local-{spec.index}", local_share(budget, cfg.local_pool_size))
    limiter = SharedLimiter(conn, budget, metrics=metrics)
    return limiter, conn


async def agent_loop(client: LLMClient, spec: TaskSpec, agent: int, rec: Recorder) -> None:
    """One agent: take a task, run it until it completes, take the next (ends when cancelled)."""

    async def discard(_text: str) -> None:
        return None

    while True:
        started = time.time()
        rec.current[agent] = started
        failed_calls = 0
        while True:
            try:
                await client.complete(spec, PRIORITY, discard, time.monotonic() + TASK_TIMEOUT_S)
                break
            except (UpstreamError, LimiterTimeout) as exc:
                # the agent would requeue the task; here the same agent retries it at once
                failed_calls += 1
                rec.failures.append((time.time(), type(exc).__name__))
            except CircuitOpenError as exc:
                rec.failures.append((time.time(), type(exc).__name__))
                await asyncio.sleep(exc.retry_after_s)  # the agent takes no work while it is open
        rec.completions.append((started, time.time(), failed_calls))
        del rec.current[agent]


async def cancel_all(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Cancel until every task has ended.

    One cancel() is not always enough: when it lands in a limiter Redis read whose socket timeout
    expires in the same loop iteration, redis-py raises its TimeoutError instead of CancelledError
    and SharedLimiter.acquire takes it for "Redis down" and keeps waiting (see README.md).
    """
    pending = set(tasks)
    for _ in range(CANCEL_ROUNDS):
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
        if not pending:
            return
    raise RuntimeError(f"{len(pending)} agent tasks ignored {CANCEL_ROUNDS} cancellations")


def limiter_decisions(metrics: AgentMetrics) -> float:
    labels = {"priority": PRIORITY}
    admitted = metrics.registry.get_sample_value(metric_names.LIMITER_ADMITTED_TOTAL, labels) or 0.0
    denied = metrics.registry.get_sample_value(metric_names.LIMITER_DENIED_TOTAL, labels) or 0.0
    return admitted + denied


def cpu_seconds_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_worker(spec: WorkerSpec, ready: Queue[int], start: Queue[float]) -> dict[str, Any]:
    cfg = spec.config
    rec = Recorder()
    metrics = AgentMetrics(process_collector=False)
    limiter, conn = make_limiter(spec, metrics)
    llm_config = LLMConfig(base_url=spec.llm_url)
    # httpx ignores `limits` when given a transport, so the pool sizes go to the inner one
    inner = httpx.AsyncHTTPTransport(
        limits=httpx.Limits(
            max_connections=llm_config.max_connections, max_keepalive_connections=llm_config.max_keepalive
        )
    )
    client = LLMClient(llm_config, limiter=limiter, metrics=metrics, transport=RecordingTransport(inner, rec))
    if conn is not None:
        await conn.ping()  # connect before the clock starts
    ready.put(spec.index)
    t0 = await asyncio.to_thread(start.get, True, READY_TIMEOUT_S)
    await asyncio.sleep(max(t0 - time.time(), 0.0))
    late_s = time.time() - t0
    loops = [
        asyncio.create_task(agent_loop(client, task_spec(cfg.max_tokens), agent, rec))
        for agent in range(cfg.concurrency)
    ]
    await asyncio.sleep(max(t0 + cfg.warmup_s - time.time(), 0.0))
    cpu0, decisions0 = cpu_seconds_self(), limiter_decisions(metrics)
    end = t0 + cfg.warmup_s + cfg.measure_s
    done, _ = await asyncio.wait(
        loops, timeout=max(end - time.time(), 0.0), return_when=asyncio.FIRST_EXCEPTION
    )
    cpu1, decisions1 = cpu_seconds_self(), limiter_decisions(metrics)
    unfinished = list(rec.current.values())
    for task in done:
        task.result()  # agent loops only end by raising: surface the error
    await cancel_all(loops)
    await client.aclose()
    if limiter is not None:
        await limiter.aclose()
    if conn is not None:
        await conn.aclose()
    return {
        "late_s": late_s,
        "responses": rec.responses,
        "completions": rec.completions,
        "failures": rec.failures,
        "unfinished": unfinished,
        "cpu_s": cpu1 - cpu0,
        "limiter_decisions": decisions1 - decisions0,
    }


def worker_process(spec: WorkerSpec, ready: Queue[int], start: Queue[float]) -> None:
    result = asyncio.run(run_worker(spec, ready, start))
    Path(spec.out_path).write_text(json.dumps(result))


def wait_until_ready(
    procs: Sequence[mp.process.BaseProcess], ready: Queue[int], timeout_s: float, what: str
) -> None:
    """Until every worker has put its index on `ready`; a worker that exits first (it can never be
    ready then) or the deadline fails it."""
    waiting = len(procs)
    deadline = time.monotonic() + timeout_s
    while waiting:
        with contextlib.suppress(queue.Empty):  # poll, so that a dead worker is noticed
            ready.get(timeout=0.5)
            waiting -= 1
        if any(p.exitcode is not None for p in procs) or time.monotonic() > deadline:
            raise RuntimeError(f"{what}: worker processes failed to start")


# -- infrastructure: redis-server and the mock upstream -------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], object], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except (OSError, httpx.HTTPError, redis.RedisError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout_s}s")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[tuple[redis.Redis, str]]:
    port = free_port()
    args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
    args += ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=2)
    try:
        wait_for(client.ping, f"redis-server on port {port}")
        yield client, f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        stop_process(proc)


@contextlib.contextmanager
def mock_upstream(cfg: BenchConfig, workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    # The mock's limits are buckets of `limit` per `window`: a short window gives a small burst.
    args = [sys.executable, "-m", "tars_agent.mockllm", "--port", str(port)]
    args += ["--requests-per-minute", str(cfg.upstream_burst), "--window-seconds", str(cfg.window_s)]
    args += ["--tokens-per-minute", str(cfg.tokens_per_s * cfg.window_s)]
    args += ["--latency", str(cfg.latency_s), "--response-tokens", str(RESPONSE_TOKENS)]
    log_path = workdir / "mock.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for(
                lambda: httpx.get(f"{base}/admin/log", timeout=1).status_code == 200, "the mock upstream"
            )
        except RuntimeError:
            print(log_path.read_text(errors="replace"), file=sys.stderr)
            raise
        yield base, proc
    finally:
        stop_process(proc)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a child process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


# -- one scenario ------------------------------------------------------------------------------


def run_scenario(
    name: str,
    cfg: BenchConfig,
    mock_base: str,
    mock_proc: subprocess.Popen[bytes],
    rds: redis.Redis,
    redis_url: str,
    tmp: Path,
) -> dict[str, Any]:
    began = time.monotonic()
    httpx.post(f"{mock_base}/admin/reset", timeout=5).raise_for_status()  # full upstream bucket
    rds.flushall()  # full limiter buckets, no pause or override left from the previous scenario
    ctx = mp.get_context("spawn")  # clean children: nothing inherited but the spec
    ready: Queue[int] = ctx.Queue()
    start: Queue[float] = ctx.Queue()
    specs = [
        WorkerSpec(i, LIMITER_OF[name], f"{mock_base}/v1", redis_url, str(tmp / f"{name}-{i}.json"), cfg)
        for i in range(cfg.processes)
    ]
    procs = [ctx.Process(target=worker_process, args=(s, ready, start), daemon=True) for s in specs]
    for p in procs:
        p.start()
    try:
        wait_until_ready(procs, ready, READY_TIMEOUT_S, f"scenario {name}")
        t0 = time.time() + START_MARGIN_S
        for _ in procs:
            start.put(t0)
        w0, w1 = t0 + cfg.warmup_s, t0 + cfg.warmup_s + cfg.measure_s
        time.sleep(max(w0 - time.time(), 0.0))
        cpu0 = (redis_cpu_s(rds), process_cpu_s(mock_proc.pid))
        time.sleep(max(w1 - time.time(), 0.0))
        cpu1 = (redis_cpu_s(rds), process_cpu_s(mock_proc.pid))
        for p in procs:
            p.join(timeout=JOIN_TIMEOUT_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(
            f"scenario {name}: a worker process failed (exit codes {[p.exitcode for p in procs]})"
        )
    results = [json.loads(Path(s.out_path).read_text()) for s in specs]
    log = httpx.get(f"{mock_base}/admin/log", timeout=10).json()
    out = analyse(name, cfg, t0, results, [e["ts"] for e in log["admitted"]], int(log["rejected"]))
    out["cpu_s"] = {
        "clients": sum(r["cpu_s"] for r in results),
        "redis": cpu1[0] - cpu0[0],
        "upstream": cpu1[1] - cpu0[1],
    }
    out["wall_s"] = time.monotonic() - began
    return out


def analyse(
    name: str,
    cfg: BenchConfig,
    t0: float,
    results: Sequence[dict[str, Any]],
    admitted: Sequence[float],
    refused_total: int,
) -> dict[str, Any]:
    """Everything measured in [t0 + warm-up, t0 + warm-up + measured); series cover the whole run."""
    w0, w1 = t0 + cfg.warmup_s, t0 + cfg.warmup_s + cfg.measure_s
    responses = [(t, status) for r in results for t, status in r["responses"]]
    attempts = in_window([t for t, _ in responses], w0, w1)
    rejected = [t for t, status in responses if status == 429]
    rejected_in = in_window(rejected, w0, w1)
    done = [(s, e, f) for r in results for s, e, f in r["completions"] if w0 <= e < w1]
    latencies = [e - s for s, e, _ in done]
    failed = in_window([t for r in results for t, _ in r["failures"]], w0, w1)
    unfinished = [t for r in results for t in r["unfinished"]]
    goodput = len(done) / cfg.measure_s
    seconds = math.ceil(cfg.warmup_s + cfg.measure_s)
    return {
        "name": name,
        "attempts": len(attempts),
        "status_429": len(rejected_in),
        "rate_429_pct": 100 * (ratio(len(rejected_in), len(attempts)) or 0.0),
        "completions": len(done),
        "failed_calls": len(failed),
        "failed_call_pct": 100 * (ratio(len(failed), len(done) + len(failed)) or 0.0),
        "goodput_per_s": goodput,
        "utilisation_pct": 100 * goodput / cfg.allowed_per_s,
        "latency_s": {f"p{p}": percentile(latencies, p) for p in (50, 95, 99)},
        "latency_max_s": max(latencies, default=None),
        "peak_admitted_1s": peak_in_window(in_window(admitted, w0, w1), 1.0),
        # a per-minute check needs a minute of log: the whole run, warm-up included
        "peak_admitted_60s": peak_in_window(admitted, 60.0) if cfg.warmup_s + cfg.measure_s >= 60 else None,
        "admitted_total": len(admitted),
        "upstream_refused_total": refused_total,
        "client_429_total": len(rejected),
        "attempts_per_s": len(attempts) / cfg.measure_s,
        "limiter_decisions_per_s": sum(r["limiter_decisions"] for r in results) / cfg.measure_s,
        "unfinished_at_end": len(unfinished),
        "oldest_unfinished_s": max((w1 - t for t in unfinished), default=None),
        "max_start_late_s": max(r["late_s"] for r in results),
        "series": {
            "admitted_per_s": per_second(admitted, t0, seconds),
            "status_429_per_s": per_second(rejected, t0, seconds),
        },
    }


# -- report ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def tables(cfg: BenchConfig, scenarios: Sequence[dict[str, Any]]) -> str:
    header = ["scenario", "attempts", "429s", "429 %", "done", "failed calls", "goodput/s", "util %"]
    header += ["p50 s", "p95 s", "p99 s", "peak/1s", "wall s"]
    rows = []
    for s in scenarios:
        lat = s["latency_s"]
        rows.append(
            [
                s["name"],
                str(s["attempts"]),
                str(s["status_429"]),
                fmt(s["rate_429_pct"]),
                str(s["completions"]),
                f"{s['failed_calls']} ({fmt(s['failed_call_pct'])} %)",
                fmt(s["goodput_per_s"], 2),
                fmt(s["utilisation_pct"]),
                fmt(lat["p50"]),
                fmt(lat["p95"]),
                fmt(lat["p99"]),
                str(s["peak_admitted_1s"]),
                fmt(s["wall_s"], 0),
            ]
        )
    cost_header = ["scenario", "attempts/s", "limiter calls/s", "CPU s: clients", "redis", "upstream"]
    cost_header += ["unfinished", "oldest unfinished s"]
    cost_rows = [
        [
            s["name"],
            fmt(s["attempts_per_s"]),
            fmt(s["limiter_decisions_per_s"]),
            fmt(s["cpu_s"]["clients"]),
            fmt(s["cpu_s"]["redis"]),
            fmt(s["cpu_s"]["upstream"]),
            str(s["unfinished_at_end"]),
            fmt(s["oldest_unfinished_s"]),
        ]
        for s in scenarios
    ]
    return "\n\n".join([render_table(header, rows), render_table(cost_header, cost_rows)])


def ratio_lines(scenarios: Sequence[dict[str, Any]]) -> list[str]:
    by_name = {s["name"]: s for s in scenarios}
    naive = by_name.get("naive")
    if naive is None:
        return []
    lines = []
    for other in ("shared-limiter", "local-limiter"):
        s = by_name.get(other)
        if s is None:
            continue
        lines.append(
            f"{other} vs naive: goodput x{fmt(ratio(s['goodput_per_s'], naive['goodput_per_s']), 3)}, "
            f"429 rate {fmt(s['rate_429_pct'])} % vs {fmt(naive['rate_429_pct'])} % "
            f"(x{fmt(ratio(s['rate_429_pct'], naive['rate_429_pct']), 3)}), "
            f"p99 latency x{fmt(ratio(s['latency_s']['p99'] or 0, naive['latency_s']['p99'] or 0), 2)}"
        )
    return lines


def plot(path: Path, cfg: BenchConfig, scenarios: Sequence[dict[str, Any]]) -> bool:
    try:  # optional: the table and the JSON do not need it
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 7))
    for s in scenarios:
        admitted, rejected = s["series"]["admitted_per_s"], s["series"]["status_429_per_s"]
        # the last value repeated so that the last second is drawn to its end
        top.step(range(len(admitted) + 1), [*admitted, admitted[-1]], where="post", label=s["name"])
        bottom.step(range(len(rejected) + 1), [*rejected, rejected[-1]], where="post", label=s["name"])
    top.axhline(cfg.allowed_per_s, color="black", linestyle="--", label="upstream limit")
    for ax in (top, bottom):
        ax.axvspan(0, cfg.warmup_s, color="0.9", label="warm-up (not measured)")
        ax.grid(alpha=0.3)
    top.set_ylabel("admitted requests / s")
    bottom.set_ylabel("429 responses / s")
    bottom.set_yscale("symlog", linthresh=10)
    bottom.set_xlabel("seconds since start of scenario")
    top.legend(loc="upper right", fontsize="small")
    top.set_title(
        f"{cfg.processes} processes x {cfg.concurrency} agents, upstream {cfg.allowed_per_s:g} req/s"
        f" ({'tokens' if cfg.tokens_bind else 'requests'} bind), bucket {cfg.upstream_burst}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument("--quick", action="store_true", help="~30 s: 3 s warm-up, 6 s measured")
    profile.add_argument("--full", action="store_true", help="~7 min: 20 s warm-up, 120 s measured")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=25, help="agents per process")
    parser.add_argument("--rate", type=int, default=10, help="upstream requests per second (10 = 600/min)")
    parser.add_argument(
        "--upstream-burst", type=int, help="upstream bucket in requests (default: the limiter's burst)"
    )
    parser.add_argument("--latency", type=float, default=0.1, help="upstream seconds per request")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument(
        "--tokens", action="store_true", help="tokens per minute binds (half the request rate)"
    )
    parser.add_argument(
        "--burst-fraction", type=float, help="as TARS_BURST_FRACTION (default: the agent's default)"
    )
    parser.add_argument(
        "--local-pool-size",
        type=int,
        help="local-limiter: processes dividing the budget (default: --processes, the exact split)",
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, run in order")
    parser.add_argument("--warmup", type=float, help="override the profile's warm-up seconds")
    parser.add_argument("--measure", type=float, help="override the profile's measured seconds")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where the JSON and PNG go")
    args = parser.parse_args(argv)
    scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown or not scenarios:
        parser.error(f"--scenarios: choose from {', '.join(SCENARIOS)}")
    warmup, measure = PROFILES["quick" if args.quick else "full" if args.full else "default"]
    limiter_burst = (
        Budget.from_rates("bench", requests_per_minute=args.rate * 60, burst_fraction=args.burst_fraction)
        .limits[0]
        .burst
    )
    return BenchConfig(
        processes=args.processes,
        concurrency=args.concurrency,
        rate=args.rate,
        upstream_burst=args.upstream_burst or limiter_burst,
        latency_s=args.latency,
        max_tokens=args.max_tokens,
        tokens_bind=args.tokens,
        burst_fraction=args.burst_fraction,
        local_pool_size=args.local_pool_size or args.processes,
        warmup_s=args.warmup if args.warmup is not None else warmup,
        measure_s=args.measure if args.measure is not None else measure,
        scenarios=scenarios,
        out_dir=str(args.out),
    )


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(argv)
    # SIGTERM (e.g. `timeout`) as an exception, so redis-server and the mock are stopped too
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    info = machine()
    command = shlex.join([sys.executable, *sys.argv])
    print(f"command: {command}")
    print(
        f"machine: nproc={info['nproc']} ({info['cpu_model'] or 'unknown CPU'}), "
        f"Python {info['python']}, {info['platform']}"
    )
    print(
        f"upstream: {cfg.rate} req/s ({cfg.rate * 60}/min), bucket {cfg.upstream_burst} requests, "
        f"{cfg.tokens_per_s * 60} tokens/min ({cfg.cost_tokens} tokens a request, "
        f"{'binding' if cfg.tokens_bind else 'not binding'}), latency {cfg.latency_s:g} s; "
        f"allowed {cfg.allowed_per_s:g} req/s"
    )
    print(
        f"load: {cfg.processes} processes x {cfg.concurrency} agents = "
        f"{cfg.processes * cfg.concurrency} concurrent; warm-up {cfg.warmup_s:g} s, "
        f"measured {cfg.measure_s:g} s per scenario",
        flush=True,
    )
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="tars-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with redis_server(tmp) as (rds, redis_url), mock_upstream(cfg, tmp) as (mock_base, mock_proc):
            for name in cfg.scenarios:
                print(f"running {name} ...", flush=True)
                results.append(run_scenario(name, cfg, mock_base, mock_proc, rds, redis_url, tmp))
    print()
    print(tables(cfg, results))
    lines = ratio_lines(results)
    if lines:
        print()
        print("\n".join(lines))
    report = {
        "command": command,
        "machine": info,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": asdict(cfg)
        | {"allowed_per_s": cfg.allowed_per_s, "tokens_per_minute": cfg.tokens_per_s * 60},
        "scenarios": results,
        "ratios": lines,
    }
    json_path = out_dir / "limiter_bench.json"
    json_path.write_text(json.dumps(report, indent=1))
    print(f"\njson: {json_path}")
    png_path = out_dir / "limiter_bench.png"
    if plot(png_path, cfg, results):
        print(f"plot: {png_path}")
    else:
        print("plot: skipped (matplotlib is not installed)")


if __name__ == "__main__":
    main()
