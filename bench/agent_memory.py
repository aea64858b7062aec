"""Agent memory: RSS per in-flight streaming request, and RSS over a soak under steady load.

A real `tars-agent` process (`python -m tars_agent.worker`, the image's entrypoint, configured
by environment as the operator configures a pod) against a real redis-server on a free port and
the project's mock LLM (`python -m tars_agent.mockllm`, its own process) streaming slowly, so that
all tasks are in flight at once:

1. idle: the agent started and pulling from an empty queue;
2. loaded: `--inflight` (100) streaming tasks at once (agent concurrency = `--inflight`), RSS
   sampled every second while every one of them streams; MB per in-flight request =
   (loaded median - idle) / inflight, against the target of 0.1 MB;
3. after: the same agent idle again once they finished (what it keeps);
4. soak (`--soak-minutes`, default 30): `--inflight` tasks in flight all the time (16 words,
   one a second, then the next task), RSS every 10 s; the slope after `--warmup-minutes`
   (MB/h, least squares) says whether it grows.

RSS is VmRSS of /proc/<pid>/status, PSS the Pss of /proc/<pid>/smaps_rollup.

    make bench-memory VENV=...                          # ~32 min (the 30 min soak)
    python bench/agent_memory.py --soak-minutes 2       # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from limiter_bench import free_port, machine, process_cpu_s, redis_server, stop_process, wait_for
from tars_agent.client import TaskClient
from tars_contract import contract, metric_names

OUT = Path(__file__).resolve().parent / "out"
TARGET_MB_PER_INFLIGHT = 0.1
MIB = 1024 * 1024


# -- pure parts ---------------------------------------------------------------------------


def mb_per_inflight(idle_mb: float, loaded_mb: float, inflight: int) -> float:
    """What each in-flight request adds to the agent's memory."""
    return (loaded_mb - idle_mb) / inflight


def slope_mb_per_hour(samples: Sequence[tuple[float, float]], warmup_s: float) -> float | None:
    """Least-squares slope (MB/h) of (seconds, MB) samples taken after `warmup_s`; None if fewer than 3."""
    kept = [(t, mb) for t, mb in samples if t >= warmup_s]
    if len(kept) < 3:
        return None
    mean_t = statistics.fmean(t for t, _ in kept)
    mean_mb = statistics.fmean(mb for _, mb in kept)
    spread = sum((t - mean_t) ** 2 for t, _ in kept)
    if spread == 0:
        return None
    return sum((t - mean_t) * (mb - mean_mb) for t, mb in kept) / spread * 3600


def memory_mb(status: str, smaps_rollup: str | None) -> tuple[float, float | None]:
    """(VmRSS, Pss) in MB from the texts of /proc/<pid>/status and /proc/<pid>/smaps_rollup."""

    def kb(text: str, key: str) -> float | None:
        for line in text.splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return None

    rss = kb(status, "VmRSS")
    if rss is None:
        raise ValueError("no VmRSS line: not a live process")
    return rss, kb(smaps_rollup, "Pss") if smaps_rollup is not None else None


# -- the shell ------------------------------------------------------------------------------


def read_memory(pid: int) -> tuple[float, float | None]:
    status = Path(f"/proc/{pid}/status").read_text()
    try:
        rollup: str | None = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        rollup = None
    return memory_mb(status, rollup)


@dataclass
class Results:
    inflight: int
    idle_rss_mb: float = 0.0
    idle_pss_mb: float | None = None
    loaded_rss_mb: list[float] = field(default_factory=list)
    loaded_pss_mb: list[float] = field(default_factory=list)
    after_rss_mb: float = 0.0
    soak: list[tuple[float, float]] = field(default_factory=list)  # (s since soak start, RSS MB)
    soak_tasks_done: int = 0
    soak_inflight: list[int] = field(default_factory=list)  # at each soak sample
    soak_cpu_s: float = 0.0  # the agent's CPU seconds over the soak
    warmup_s: float = 0.0


@contextmanager
def mock_llm(latency_s: float, chunk_delay_s: float, tokens: int, workdir: Path) -> Iterator[str]:
    """The mock upstream in its own process; yields its base URL (…/v1 for the agent)."""
    port = free_port()
    args = [sys.executable, "-m", "tars_agent.mockllm", "--port", str(port), "--latency", str(latency_s)]
    args += ["--chunk-delay", str(chunk_delay_s), "--response-tokens", str(tokens)]
    with (workdir / "mock.log").open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: httpx.get(f"{base}/admin/log", timeout=1).status_code == 200,
            "the mock LLM",
            timeout_s=120,
        )
        yield base
    finally:
        stop_process(proc)


@contextmanager
def agent_process(
    redis_url: str,
    llm: str,
    concurrency: int,
    token: str,
    workdir: Path,
    *,
    pool: str = "memory",
    pod: str = "memory-agent",
    source: Path | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`tars-agent` configured by environment as a pod is; yields the process and its HTTP base.
    `source`: a checkout whose agent_image/ and contract/ to run (first on PYTHONPATH)."""
    port = free_port()
    env = {
        **os.environ,
        **(
            {"PYTHONPATH": os.pathsep.join(str(source / d) for d in ("agent_image", "contract"))}
            if source
            else {}
        ),
        contract.ENV_POOL: pool,
        contract.ENV_NAMESPACE: "bench",
        contract.ENV_POD_NAME: pod,
        contract.ENV_REDIS_URL: redis_url,
        contract.ENV_LLM_BASE_URL: f"{llm}/v1",
        contract.ENV_CONCURRENCY: str(concurrency),
        contract.ENV_HTTP_PORT: str(port),
        contract.ENV_HTTP_BIND: "127.0.0.1",
        contract.ENV_AGENT_TOKEN: token,
        # a budget far above the load: every request goes through the shared limiter, as in a pool
        contract.ENV_REQUESTS_PER_MINUTE: "1000000",
        contract.ENV_RESULT_TTL_SECONDS: "120",  # keeps the soak's Redis small; not the agent's memory
        "TARS_TASK_TIMEOUT_SECONDS": "600",
    }
    with (workdir / f"{pod}.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tars_agent.worker"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: httpx.get(f"{base}{contract.PATH_READYZ}", timeout=1).status_code == 200,
            "the agent",
            timeout_s=120,  # a start-up on a busy shared machine
        )
        yield proc, base
    finally:
        stop_process(proc)


def inflight_now(base: str, token: str) -> int:
    reply = httpx.get(
        f"{base}{contract.PATH_STATUS}", headers={"Authorization": f"Bearer {token}"}, timeout=5
    )
    return int(reply.json()["inflight"])


def admitted(llm: str) -> int:
    return len(httpx.get(f"{llm}/admin/log", timeout=10).json()["admitted"])


def task(max_tokens: int) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": "tell me a long story"}], "max_tokens": max_tokens}


def tasks_done(base: str) -> int:
    """The agent's own count of finished tasks (tars_tasks_total{outcome="done"})."""
    for line in httpx.get(f"{base}{contract.PATH_METRICS}", timeout=10).text.splitlines():
        if line.startswith(f'{metric_names.TASKS_TOTAL}{{outcome="done"}}'):
            return int(float(line.split()[-1]))
    return 0


async def poll(check: Callable[[], bool], what: str, timeout_s: float) -> None:
    """Poll a blocking predicate with a deadline, letting the loop run in between."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)


async def measure_loaded(client: TaskClient, pid: int, base: str, llm: str, token: str, r: Results) -> None:
    """Idle, `inflight` slow streams at once, idle again."""
    idle = []
    for _ in range(3):  # the baseline: three samples a second apart, the last one kept
        idle.append(read_memory(pid))
        await asyncio.sleep(1)
    r.idle_rss_mb, r.idle_pss_mb = idle[-1]
    ids = [(await client.submit_payload(task(400), "normal")).task_id for _ in range(r.inflight)]
    # every request admitted upstream and its stream begun (first byte after 0.5 s)
    await poll(
        lambda: inflight_now(base, token) == r.inflight and admitted(llm) >= r.inflight, "all in flight", 300
    )
    for _ in range(15):
        rss, pss = read_memory(pid)
        r.loaded_rss_mb.append(rss)
        if pss is not None:
            r.loaded_pss_mb.append(pss)
        await asyncio.sleep(1)  # the sampling period
    assert inflight_now(base, token) == r.inflight, "tasks finished while being sampled: make them longer"
    for task_id in ids:
        await client.wait(task_id, 300)
    await poll(lambda: inflight_now(base, token) == 0, "the agent idle again", 60)
    r.after_rss_mb = read_memory(pid)[0]


async def soak(client: TaskClient, pid: int, base: str, token: str, minutes: float, r: Results) -> None:
    """Keep the agent full with streaming tasks (16 words, one a second); RSS every 10 s."""
    cpu_at_start = process_cpu_s(pid)
    started = time.monotonic()
    end = started + minutes * 60
    next_sample = started
    done_at_start = await asyncio.to_thread(tasks_done, base)
    while time.monotonic() < end:
        waiting = sum((await client.waiting()).values())
        for _ in range(max(r.inflight // 5 - waiting, 0)):  # a small backlog: no slot ever idles
            await client.submit_payload(task(16), "normal")
        if time.monotonic() >= next_sample:
            r.soak.append((time.monotonic() - started, read_memory(pid)[0]))
            next_sample += 10
            r.soak_tasks_done = await asyncio.to_thread(tasks_done, base) - done_at_start
            r.soak_inflight.append(await asyncio.to_thread(inflight_now, base, token))
            elapsed_min = (time.monotonic() - started) / 60
            print(
                f"soak {elapsed_min:5.1f} min: RSS {r.soak[-1][1]:.1f} MB, {r.soak_tasks_done} tasks done",
                flush=True,
            )
        await asyncio.sleep(0.5)  # the top-up period
    r.soak_cpu_s = process_cpu_s(pid) - cpu_at_start


def table(r: Results) -> str:
    loaded = statistics.median(r.loaded_rss_mb)
    per = mb_per_inflight(r.idle_rss_mb, loaded, r.inflight)
    lines = [
        f"{'phase':<44}{'RSS MB':>10}{'PSS MB':>10}",
        f"{'idle (started, empty queue)':<44}{r.idle_rss_mb:>10.1f}{r.idle_pss_mb or 0:>10.1f}",
        f"{f'{r.inflight} streaming tasks in flight (median)':<44}{loaded:>10.1f}"
        f"{statistics.median(r.loaded_pss_mb) if r.loaded_pss_mb else 0:>10.1f}",
        f"{f'{r.inflight} in flight (max of {len(r.loaded_rss_mb)})':<44}{max(r.loaded_rss_mb):>10.1f}",
        f"{'idle again after they finished':<44}{r.after_rss_mb:>10.1f}",
        "",
        f"MB per in-flight request: {per:.3f} (target <= {TARGET_MB_PER_INFLIGHT}: "
        f"{'met' if per <= TARGET_MB_PER_INFLIGHT else 'MISSED'})",
    ]
    if r.soak:
        slope = slope_mb_per_hour(r.soak, r.warmup_s)
        after = [mb for t, mb in r.soak if t >= r.warmup_s]
        lines += [
            "",
            f"soak: {r.soak[-1][0] / 60:.1f} min, {len(r.soak)} samples, {r.soak_tasks_done} tasks done, "
            f"in flight at the samples: median {statistics.median(r.soak_inflight):.0f}, "
            f"min {min(r.soak_inflight)}; agent CPU {r.soak_cpu_s / r.soak[-1][0]:.0%} of a core",
            f"soak RSS after {r.warmup_s / 60:.0f} min warm-up: min {min(after):.1f}, max {max(after):.1f}, "
            f"last {after[-1]:.1f} MB; slope "
            + (f"{slope:+.2f} MB/h" if slope is not None else "n/a (too few samples)"),
        ]
    return "\n".join(lines)


def plot(path: Path, r: Results, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if r.soak else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    labels = ["idle", f"{r.inflight} in flight", "idle after"]
    values = [r.idle_rss_mb, statistics.median(r.loaded_rss_mb), r.after_rss_mb]
    ax.bar(labels, values, color=["#999", "#c44", "#999"])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("agent RSS: idle vs in flight", fontsize=9)
    if r.soak:
        ax = axes[0][1]
        ax.plot([t / 60 for t, _ in r.soak], [mb for _, mb in r.soak], ".-", ms=3)
        ax.axvline(r.warmup_s / 60, color="#999", ls="--", lw=1)
        slope = slope_mb_per_hour(r.soak, r.warmup_s)
        ax.set_title(f"soak, {r.inflight} in flight: slope {slope or 0:+.2f} MB/h after warm-up", fontsize=9)
        ax.set_xlabel("minutes")
        ax.set_ylabel("RSS (MB)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def run(args: argparse.Namespace, redis_url: str, workdir: Path, r: Results) -> None:
    token = secrets.token_hex(16)
    redis = aioredis.from_url(redis_url, decode_responses=True)
    client = TaskClient(redis, "bench", "memory")
    # 400 words, one every 0.1 s: 40 s streams, all of them at once
    with (
        mock_llm(0.5, args.chunk_delay, 400, workdir) as llm,
        agent_process(redis_url, llm, r.inflight, token, workdir) as (proc, base),
    ):
        try:
            await measure_loaded(client, proc.pid, base, llm, token, r)
        except SystemExit:
            print((workdir / "memory-agent.log").read_text(errors="replace")[-4000:], file=sys.stderr)
            raise
        if args.soak_minutes > 0:
            # a word a second: 16 s tasks, so ~6 tasks/s keep every slot busy on a shared machine
            async with httpx.AsyncClient(timeout=10) as http:
                (await http.post(f"{llm}/admin/config", json={"chunk_delay_s": 1.0})).raise_for_status()
            await soak(client, proc.pid, base, token, args.soak_minutes, r)
    await redis.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inflight", type=int, default=100, help="concurrent streaming tasks")
    parser.add_argument("--soak-minutes", type=float, default=30.0, help="0: no soak")
    parser.add_argument(
        "--warmup-minutes", type=float, default=5.0, help="soak samples before it are not fitted"
    )
    parser.add_argument("--chunk-delay", type=float, default=0.1, help="seconds between streamed words")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    info = machine()
    command = shlex.join(["python", "bench/agent_memory.py", *(sys.argv[1:] if argv is None else argv)])
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"command: {command}\ndate: {when}\nmachine: {info}", flush=True)
    r = Results(args.inflight, warmup_s=min(args.warmup_minutes, args.soak_minutes / 2) * 60)
    with tempfile.TemporaryDirectory(prefix="agent-memory-") as tmp, redis_server(Path(tmp)) as (_, url):
        asyncio.run(run(args, url, Path(tmp), r))
    report = table(r)
    print()
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "agent_memory.json").write_text(
        json.dumps(asdict(r) | {"command": command, "date": when}, indent=2)
    )
    title = f"{command} | {when} | {info['nproc']} cores, {info['cpu_model']}"
    plot(args.out / "agent_memory.png", r, title)
    print(f"\nwrote {args.out / 'agent_memory.png'} and {args.out / 'agent_memory.json'}")


if __name__ == "__main__":
    main()
