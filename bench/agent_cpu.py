"""Agent CPU per task and burst pickup on loopback: this checkout's agents vs another commit's.

What makes a burst slow on a small node is CPU: a Python agent spends milliseconds of it per task
(the upstream call, the queue's Redis calls, its own bookkeeping), and warm agents share the
node's cores with everything else. This measures that cost without a cluster in the way:

a real redis-server on a free port, the project's mock LLM in its own process (0.2 s to the first
byte, 8 words at once: the upstream of `warm_pickup.py`) and `--agents` (4) `tars-agent`
processes of `--slots` (25) each, configured by environment as the operator configures a pod.
Each round submits a `--burst` (300) of streamed tasks at once (32 submits in flight) and waits
until all are done. Per round: submit -> first attempt start per task on Redis' clock (p50 /
p99, as `warm_pickup.py`), the agents' CPU seconds per task (utime + stime of /proc/<pid>/stat),
the mock's and Redis' CPU, and Redis commands per task (INFO commandstats; commands run by
scripts included, the submit script's too).

With `--baseline DIR` (a checkout of another commit, e.g. `git worktree add /tmp/base <commit>`),
a second set of agents runs that tree's agent_image/ and contract/ (first on PYTHONPATH) against
a pool of its own, and rounds alternate between the two sets, so that both see the same machine:
the table compares their medians side by side.

    make bench-agent-cpu VENV=...                             # ~2 min
    python bench/agent_cpu.py --baseline /tmp/base --rounds 6
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from agent_memory import agent_process, mock_llm
from limiter_bench import machine, process_cpu_s, redis_cpu_s, redis_server
from pickup_stats import quantiles
from tars_agent.client import TaskClient
from warm_pickup import all_done, burst, read_pickups

OUT = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parent.parent
NAMESPACE = "bench"


@dataclass
class Round:
    variant: str
    pickup: dict[str, float]  # quantiles of submit -> first attempt start, seconds
    agent_cpu_ms_per_task: float
    mock_cpu_ms_per_task: float
    redis_cpu_ms_per_task: float
    commands_per_task: float
    script_calls_per_task: float
    load_average: float


@dataclass
class Results:
    variants: dict[str, str]  # name -> source tree
    agents: int
    slots: int
    burst: int
    rounds: list[Round] = field(default_factory=list)


@contextlib.contextmanager
def agents(
    source: Path, pool: str, redis_url: str, llm: str, count: int, slots: int, workdir: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` agent processes of the tree `source` on one pool."""
    token = secrets.token_hex(16)
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(
                agent_process(
                    redis_url, llm, slots, token, workdir, pool=pool, pod=f"{pool}-{i}", source=source
                )
            )[0]
            for i in range(count)
        ]


def pid_of(*words: str) -> int:
    """The process whose command line holds `words` in a row (the mock, started by agent_memory)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                if any(argv[i : i + len(words)] == list(words) for i in range(len(argv))):
                    return int(entry.name)
    raise RuntimeError(f"no process runs {' '.join(words)}")


def commands(stats: dict[str, Any]) -> tuple[int, int]:
    """(all commands, script calls) from INFO commandstats."""
    total = sum(int(v["calls"]) for v in stats.values())
    scripts = sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("eval", "evalsha"))
    return total, scripts


async def rounds(
    args: argparse.Namespace,
    r: Results,
    url: str,
    rds: redis.Redis,
    mock_pid: int,
    sets: dict[str, list[subprocess.Popen[bytes]]],
) -> None:
    """`args.rounds` bursts per set of agents, the sets in turn."""
    client_redis = aioredis.from_url(url)
    try:
        for i in range(args.rounds * len(sets)):
            name = list(sets)[i % len(sets)]
            client = TaskClient(client_redis, NAMESPACE, name)
            await asyncio.sleep(args.pause)  # the last round's stragglers and GC settle
            procs = sets[name]
            cpu0 = sum(process_cpu_s(p.pid) for p in procs)
            mock0, redis0 = process_cpu_s(mock_pid), redis_cpu_s(rds)
            cmd0 = commands(rds.info("commandstats"))
            ids = await burst(client, r.burst)
            await all_done(client)
            cmd1 = commands(rds.info("commandstats"))
            pickups = await read_pickups(client, ids)
            n = r.burst
            rnd = Round(
                variant=name,
                pickup=quantiles(pickups),
                agent_cpu_ms_per_task=(sum(process_cpu_s(p.pid) for p in procs) - cpu0) / n * 1000,
                mock_cpu_ms_per_task=(process_cpu_s(mock_pid) - mock0) / n * 1000,
                redis_cpu_ms_per_task=(redis_cpu_s(rds) - redis0) / n * 1000,
                commands_per_task=(cmd1[0] - cmd0[0]) / n,
                script_calls_per_task=(cmd1[1] - cmd0[1]) / n,
                load_average=os.getloadavg()[0],
            )
            r.rounds.append(rnd)
            print(
                f"round {i + 1:2d} {name:<9} p50 {rnd.pickup['p50'] * 1000:7.0f} ms  "
                f"p99 {rnd.pickup['p99'] * 1000:7.0f} ms  "
                f"agents {rnd.agent_cpu_ms_per_task:5.2f} ms CPU/task  load {rnd.load_average:.1f}",
                flush=True,
            )
    finally:
        await client_redis.aclose()


def run(args: argparse.Namespace, r: Results, workdir: Path) -> None:
    with contextlib.ExitStack() as stack:
        rds, url = stack.enter_context(redis_server(workdir))
        llm = stack.enter_context(mock_llm(0.2, 0.0, 8, workdir))
        mock_pid = pid_of("tars_agent.mockllm", "--port", llm.rsplit(":", 1)[1])
        sets = {
            name: stack.enter_context(agents(Path(src), name, url, llm, r.agents, r.slots, workdir))
            for name, src in r.variants.items()
        }
        asyncio.run(rounds(args, r, url, rds, mock_pid, sets))


def summary(r: Results) -> dict[str, dict[str, float]]:
    """Per variant, the median over its rounds of each measure."""
    out: dict[str, dict[str, float]] = {}
    for name in r.variants:
        rounds = [x for x in r.rounds if x.variant == name]
        out[name] = {
            "p50_ms": statistics.median(x.pickup["p50"] for x in rounds) * 1000,
            "p99_ms": statistics.median(x.pickup["p99"] for x in rounds) * 1000,
            "agent_cpu_ms": statistics.median(x.agent_cpu_ms_per_task for x in rounds),
            "mock_cpu_ms": statistics.median(x.mock_cpu_ms_per_task for x in rounds),
            "redis_cpu_ms": statistics.median(x.redis_cpu_ms_per_task for x in rounds),
            "commands": statistics.median(x.commands_per_task for x in rounds),
            "script_calls": statistics.median(x.script_calls_per_task for x in rounds),
            "rounds": float(len(rounds)),
        }
    return out


ROWS = (
    ("burst pickup p50 (ms)", "p50_ms", "{:.0f}"),
    ("burst pickup p99 (ms)", "p99_ms", "{:.0f}"),
    ("agent CPU per task (ms)", "agent_cpu_ms", "{:.2f}"),
    ("mock LLM CPU per task (ms)", "mock_cpu_ms", "{:.2f}"),
    ("Redis CPU per task (ms)", "redis_cpu_ms", "{:.2f}"),
    ("Redis commands per task", "commands", "{:.1f}"),
    ("script calls per task", "script_calls", "{:.2f}"),
)


def table(r: Results) -> str:
    s = summary(r)
    names = list(r.variants)
    head = f"{'median over rounds':<30}" + "".join(f"{n:>14}" for n in names)
    if len(names) == 2:
        head += f"{'ratio':>10}"
    lines = [head]
    for label, key, fmt in ROWS:
        line = f"{label:<30}" + "".join(f"{fmt.format(s[n][key]):>14}" for n in names)
        if len(names) == 2 and s[names[1]][key]:
            line += f"{s[names[0]][key] / s[names[1]][key]:>10.2f}"
        lines.append(line)
    lines.append(f"{'rounds':<30}" + "".join(f"{s[n]['rounds']:>14.0f}" for n in names))
    return "\n".join(lines)


def plot(path: Path, r: Results, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(r)
    names = list(r.variants)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    parts = [
        ("agent", "agent_cpu_ms", "#c44"),
        ("mock LLM", "mock_cpu_ms", "#999"),
        ("Redis", "redis_cpu_ms", "#49c"),
    ]
    bottom = [0.0] * len(names)
    for label, key, color in parts:
        values = [s[n][key] for n in names]
        ax.bar(names, values, bottom=bottom, color=color, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for i, total in enumerate(bottom):
        ax.text(i, total, f"{total:.1f} ms", ha="center", va="bottom")
    ax.set_ylabel("CPU ms per task (median of rounds)")
    ax.set_title("CPU per task in a burst", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1]
    for name in names:
        xs = [i for i, x in enumerate(r.rounds) if x.variant == name]
        ax.plot(xs, [r.rounds[i].pickup["p50"] * 1000 for i in xs], "o-", label=f"{name} p50")
        ax.plot(xs, [r.rounds[i].pickup["p99"] * 1000 for i in xs], "x--", label=f"{name} p99")
    ax.set_xlabel("round (alternating)")
    ax.set_ylabel("submit -> start (ms)")
    ax.set_title(f"{r.burst}-task burst on {r.agents} x {r.slots} slots", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--slots", type=int, default=25, help="concurrency of each agent")
    parser.add_argument("--burst", type=int, default=300, help="tasks submitted at once per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per variant")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between rounds")
    parser.add_argument("--baseline", type=Path, help="a checkout of another commit to compare with")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    variants = {"this": str(REPO)}
    if args.baseline:
        if not (args.baseline / "agent_image" / "tars_agent").is_dir():
            parser.error(f"--baseline {args.baseline}: no agent_image/tars_agent there (a checkout?)")
        variants["baseline"] = str(args.baseline.resolve())
    r = Results(variants=variants, agents=args.agents, slots=args.slots, burst=args.burst)
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="agent-cpu-") as tmp:
        run(args, r, Path(tmp))
    text = table(r)
    m = machine()
    title = (
        f"bench/agent_cpu.py, {started:%Y-%m-%d %H:%M} UTC, nproc={m['nproc']}, "
        f"load {r.rounds[0].load_average:.1f} -> {r.rounds[-1].load_average:.1f}"
    )
    print(f"\n{title}\n{text}")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(args.out / "agent_cpu.png", r, title)
    report = {"machine": m, "started": started.isoformat(), "results": asdict(r), "summary": summary(r)}
    (args.out / "agent_cpu.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'agent_cpu.png'} and agent_cpu.json")


if __name__ == "__main__":
    main()
