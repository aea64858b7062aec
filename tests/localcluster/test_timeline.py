"""The demo's live view and timeline: rows line up under their headers, rates and the fault's
outcome are computed from the samples, and the PNG shows every series and the fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from tars_localcluster.timeline import HEADER, FaultOutcome, Mark, Sample, per_second, plot, row


def sample(t: float, ok: int = 0, refused: int = 0, done: int = 0) -> Sample:
    return Sample(
        t=t,
        waiting={"critical": 1, "high": 22, "normal": 30, "low": 130},
        done={"critical": done},
        desired=6,
        ready=4,
        busy=3,
        upstream_ok=ok,
        upstream_429=refused,
    )


def test_each_row_lines_up_under_the_header() -> None:
    line = row(sample(12.25, ok=1234, refused=5, done=40))
    assert len(line) == len(HEADER)
    columns = [c.split() for c in line.split("|")]
    assert columns == [["12.2", "40"], ["1/22/30/130"], ["6", "4", "3"], ["1234", "5"]]
    assert [c.split() for c in HEADER.split("|")][1] == ["waiting", "c/h/n/l"]


@pytest.mark.parametrize(
    ("times", "counts", "rates"),
    [
        ([], [], []),
        ([0.0], [5], [0.0]),
        ([0.0, 1.0, 3.0], [0, 10, 30], [0.0, 10.0, 10.0]),
        ([0.0, 0.5, 0.5], [0, 4, 9], [0.0, 8.0, 0.0]),  # two samples at one instant: no rate
    ],
)
def test_rates_come_from_the_running_counts(
    times: list[float], counts: list[int], rates: list[float]
) -> None:
    assert per_second(times, counts) == rates


def test_rates_refuse_mismatched_series() -> None:
    with pytest.raises(ValueError, match="3 times for 2 counts"):
        per_second([0.0, 1.0, 2.0], [1, 2])


@pytest.mark.parametrize(
    ("finished_by", "recovered", "says"),
    [
        ({"t1": "demo-b", "t2": "demo-c"}, True, "holding 2 task(s): 2 finished by demo-b, demo-c"),
        ({"t1": "demo-b", "t2": None}, False, "1 finished by demo-b; 1 NOT finished"),
        ({}, True, "it held none by then"),
    ],
)
def test_the_fault_report_says_who_finished_the_killed_agents_tasks(
    finished_by: dict[str, str | None], recovered: bool, says: str
) -> None:
    outcome = FaultOutcome("demo-a", 3.5, finished_by)
    assert outcome.recovered is recovered
    assert says in outcome.describe()
    assert outcome.describe().startswith("fault: agent demo-a killed at 3.5s")


def test_the_timeline_draws_every_series_and_marks_the_fault(tmp_path: Path) -> None:
    samples = [sample(float(t), ok=10 * t, refused=0, done=t) for t in range(6)]
    path = tmp_path / "out" / "timeline.png"
    fig = plot(samples, [Mark(2.0, "agent demo-a killed")], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    queue, agents, upstream, done = fig.axes
    assert [line.get_label() for line in queue.lines if not line.get_label().startswith("_")] == [
        "critical",
        "high",
        "normal",
        "low",
    ]
    assert [line.get_label() for line in agents.lines][:3] == ["desired", "ready", "busy"]
    admitted = next(line for line in upstream.lines if line.get_label() == "admitted")
    assert list(admitted.get_ydata()) == [0.0, 10.0, 10.0, 10.0, 10.0, 10.0]
    for ax in fig.axes:  # the fault's vertical line on every panel
        assert any(list(line.get_xdata()) == [2.0, 2.0] for line in ax.lines)
    assert list(done.lines[0].get_ydata()) == [0, 1, 2, 3, 4, 5]  # critical, as sampled
    assert "agent demo-a killed" in [t.get_text() for t in queue.texts]
