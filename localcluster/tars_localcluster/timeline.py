"""The demo's story as data: one sample per second, a live row per sample, a PNG at the end.

Pure functions of the samples the demo took (queue, agents, upstream, completions), so the
rendering is tested without a cluster; demo.py takes the samples and injects the fault.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tars_agent.tasks import PRIORITIES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PRIORITY_COLOURS = {"critical": "tab:red", "high": "tab:orange", "normal": "tab:blue", "low": "tab:gray"}


@dataclass(frozen=True)
class Sample:
    """What the demo saw at `t` seconds after the burst was submitted."""

    t: float
    waiting: Mapping[str, int]  # tasks not yet taken, per priority
    done: Mapping[str, int]  # tasks finished so far, per priority
    desired: int  # the AgentPool's status: what the operator wants ...
    ready: int  # ... the agents that are Ready ...
    busy: int  # ... and those working on a task
    upstream_ok: int  # requests the mock LLM API admitted so far
    upstream_429: int  # requests it refused with 429 so far


@dataclass(frozen=True)
class Mark:
    """An instant worth a vertical line on every panel (the injected fault)."""

    t: float
    label: str


def _initials(values: Mapping[str, int]) -> str:
    return "/".join(str(values.get(p, 0)) for p in PRIORITIES)


HEADER = (
    f"{'t s':>6} {'done':>5} | {'waiting ' + '/'.join(p[0] for p in PRIORITIES):>17} | "
    f"{'desired':>7} {'ready':>5} {'busy':>4} | {'upstream ok':>11} {'429':>4}"
)


def row(sample: Sample) -> str:
    """One line of the live view, aligned under HEADER."""
    return (
        f"{sample.t:>6.1f} {sum(sample.done.values()):>5} | {_initials(sample.waiting):>17} | "
        f"{sample.desired:>7} {sample.ready:>5} {sample.busy:>4} | "
        f"{sample.upstream_ok:>11} {sample.upstream_429:>4}"
    )


def per_second(times: Sequence[float], counts: Sequence[int]) -> list[float]:
    """Rates between consecutive samples of a running count (the first sample has none: 0)."""
    if len(times) != len(counts):
        raise ValueError(f"{len(times)} times for {len(counts)} counts")
    rates = [0.0] if times else []
    for i in range(1, len(times)):
        dt = times[i] - times[i - 1]
        rates.append((counts[i] - counts[i - 1]) / dt if dt > 0 else 0.0)
    return rates


@dataclass(frozen=True)
class FaultOutcome:
    """An agent killed mid-task, and what became of the tasks it held."""

    victim: str
    t: float
    # task id -> the agent that finished it (None: not finished)
    finished_by: Mapping[str, str | None] = field(default_factory=dict)

    def describe(self) -> str:
        held = len(self.finished_by)
        others = sorted({w for w in self.finished_by.values() if w is not None})
        unfinished = sum(1 for w in self.finished_by.values() if w is None)
        text = f"fault: agent {self.victim} killed at {self.t:.1f}s, holding {held} task(s)"
        if held == 0:
            return text + "; it held none by then"
        parts = []
        if others:
            parts.append(f"{held - unfinished} finished by {', '.join(others)}")
        if unfinished:
            parts.append(f"{unfinished} NOT finished")
        return f"{text}: {'; '.join(parts)}"

    @property
    def recovered(self) -> bool:
        return all(w is not None for w in self.finished_by.values())


def plot(samples: Sequence[Sample], marks: Sequence[Mark], path: Path) -> Figure:
    """Four panels over time: queue per priority, agents, upstream traffic, completions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t for s in samples]
    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(9, 10), constrained_layout=True)
    queue, agents, upstream, done = axes
    for p in PRIORITIES:
        queue.plot(t, [s.waiting.get(p, 0) for s in samples], label=p, color=PRIORITY_COLOURS[p])
        done.plot(t, [s.done.get(p, 0) for s in samples], label=p, color=PRIORITY_COLOURS[p])
    queue.set_ylabel("tasks waiting")
    done.set_ylabel("tasks done")
    for label, values, style in (
        ("desired", [s.desired for s in samples], "--"),
        ("ready", [s.ready for s in samples], "-"),
        ("busy", [s.busy for s in samples], ":"),
    ):
        agents.step(t, values, where="post", linestyle=style, label=label)
    agents.set_ylabel("agents")
    upstream.plot(t, per_second(t, [s.upstream_ok for s in samples]), label="admitted", color="tab:green")
    upstream.plot(t, per_second(t, [s.upstream_429 for s in samples]), label="429", color="tab:red")
    upstream.set_ylabel("upstream requests/s")
    done.set_xlabel("seconds since the burst was submitted")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
        for mark in marks:
            ax.axvline(mark.t, color="black", linestyle="-.", linewidth=1)
    for mark in marks:
        queue.annotate(
            mark.label,
            (mark.t, 1),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize="small",
        )
    fig.suptitle("make demo: a burst of tasks through an AgentPool")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
