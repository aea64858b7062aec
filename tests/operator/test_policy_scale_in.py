"""Table-driven tests of policy/scale_in.py."""

from datetime import timedelta

import pytest
from factories import T0, busy, idle, pod

from tars_operator.policy.actions import Delete, Drain
from tars_operator.policy.observe import PodState
from tars_operator.policy.scale_in import choose, finish_drains, reap

OLD, NEW = timedelta(minutes=20), timedelta(minutes=1)
POOL = [
    busy("busy-old", age=timedelta(hours=1)),
    idle("idle-old", age=OLD),
    idle("idle-new", age=NEW),
    pod("unknown", inflight=None),
    pod("starting", ready=False, inflight=None),
    pod("pending", phase="Pending", ready=False, inflight=None),
    pod("unsched", phase="Pending", ready=False, unschedulable=True, inflight=None),
    pod("surge", ready=False, inflight=None, replaces="idle-old"),
]


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, []),
        (1, [Delete("unsched", "scale-in: unschedulable pod, never ran")]),
        (
            4,
            [
                Delete("unsched", "scale-in: unschedulable pod, never ran"),
                Delete("pending", "scale-in: starting pod, never ran"),
                Drain("starting", "scale-in: starting pod"),
                Drain("idle-old", "scale-in: idle pod"),
            ],
        ),
        # Asked for everything: the busy, the unknown and the protected surge pod are never chosen.
        (
            99,
            [
                Delete("unsched", "scale-in: unschedulable pod, never ran"),
                Delete("pending", "scale-in: starting pod, never ran"),
                Drain("starting", "scale-in: starting pod"),
                Drain("idle-old", "scale-in: idle pod"),
                Drain("idle-new", "scale-in: idle pod"),
            ],
        ),
    ],
)
def test_choose(n: int, expected: list[Drain | Delete]) -> None:
    assert choose(POOL, n, frozenset({"surge"})) == expected


def test_choose_never_picks_busy_pods() -> None:
    pods = [busy(f"b{i}") for i in range(5)]
    assert choose(pods, 5, frozenset()) == []


TIMEOUT = timedelta(seconds=120)


@pytest.mark.parametrize(
    ("state", "deleted"),
    [
        (idle("d", draining_since=T0 - timedelta(seconds=5)), True),  # re-checked idle
        (busy("d", draining_since=T0 - timedelta(seconds=5)), False),  # still working: wait
        (busy("d", draining_since=T0 - TIMEOUT), True),  # drain timeout
        (pod("d", inflight=None, draining_since=T0 - timedelta(seconds=5)), False),  # unknown: wait
        (pod("d", inflight=None, draining_since=T0 - TIMEOUT), True),
        (busy("d", draining_since=T0 + timedelta(hours=1)), False),  # clock went back: wait longer
        (idle("d", draining_since=T0 - TIMEOUT, deleting=True), False),  # already going
        (idle("d"), False),  # not draining at all
    ],
)
def test_finish_drains(state: PodState, deleted: bool) -> None:
    assert bool(finish_drains([state], T0, TIMEOUT)) == deleted


def test_reap_deletes_finished_pods_once() -> None:
    pods = [
        pod("ok"),
        pod("done", phase="Succeeded"),
        pod("crash", phase="Failed"),
        pod("gone", phase="Failed", deleting=True),
    ]
    assert reap(pods) == [Delete("done", "pod Succeeded"), Delete("crash", "pod Failed")]
