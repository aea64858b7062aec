"""Table-driven tests of policy/rotation.py."""

from datetime import timedelta

import pytest
from factories import T0, busy, idle, pod

from tars_operator.policy.actions import Drain
from tars_operator.policy.observe import PodState
from tars_operator.policy.rotation import Replace, decide, jitter

TTL, SPREAD = timedelta(minutes=30), timedelta(minutes=3)
OLD = TTL + SPREAD  # due whatever the jitter
HASH = "h1"


def run(
    pods: list[PodState], max_unavailable: int = 1, excluded: frozenset[str] = frozenset()
) -> tuple[tuple[Replace, ...], tuple[Drain, ...]]:
    d = decide(pods, T0, TTL, SPREAD, max_unavailable, HASH, excluded)
    return d.replacements, d.drains


def old(name: str, age: timedelta = OLD, **fields: object) -> PodState:
    return idle(name, age=age, template_hash=HASH, **fields)


def young(name: str, **fields: object) -> PodState:
    return idle(name, template_hash=HASH, **fields)


REASON = f"rotation: older than ttl {TTL}"


@pytest.mark.parametrize(
    ("pods", "max_unavailable", "replacements", "drains"),
    [
        ([young("a"), young("b")], 1, (), ()),
        # Surge first: a replacement is created, the old pod keeps serving.
        ([old("a"), young("b")], 1, (Replace("a", REASON),), ()),
        # Oldest first, at most maxUnavailable at once.
        ([old("b", age=OLD + timedelta(minutes=1)), old("a")], 1, (Replace("b", REASON),), ()),
        ([old("a"), old("b"), old("c")], 2, (Replace("a", REASON), Replace("b", REASON)), ()),
        # Replacement not ready yet: wait, and it holds the only slot.
        (
            [old("a"), old("b"), pod("r", ready=False, inflight=None, replaces="a", template_hash=HASH)],
            1,
            (),
            (),
        ),
        # Replacement ready: drain the old pod (even a busy one).
        (
            [busy("a", age=OLD, template_hash=HASH), young("r", replaces="a")],
            1,
            (),
            (Drain("a", f"{REASON}; replacement r is ready"),),
        ),
        # Unschedulable replacement stalls the rotation; the old pod is not drained.
        (
            [
                old("a"),
                pod("r", phase="Pending", ready=False, unschedulable=True, inflight=None, replaces="a"),
            ],
            1,
            (),
            (),
        ),
        # An old pod still draining next to its replacement keeps the slot.
        ([old("a", draining_since=T0), young("r", replaces="a"), old("b")], 1, (), ()),
        # Template changed: due at once, whatever the age.
        ([idle("a", template_hash="h0")], 1, (Replace("a", "rotation: pod template changed"),), ()),
    ],
)
def test_decide(
    pods: list[PodState], max_unavailable: int, replacements: tuple[Replace, ...], drains: tuple[Drain, ...]
) -> None:
    assert run(pods, max_unavailable) == (replacements, drains)


def test_excluded_pods_are_left_to_scale_in() -> None:
    assert run([old("a")], excluded=frozenset({"a"})) == ((), ())


def test_jitter_is_deterministic_and_spread() -> None:
    offsets = [jitter(f"uid-{i}", SPREAD) for i in range(200)]
    assert offsets == [jitter(f"uid-{i}", SPREAD) for i in range(200)]
    assert all(timedelta(0) <= o < SPREAD for o in offsets)
    assert max(offsets) - min(offsets) > SPREAD * 0.8  # not all pods rotate together


def test_pod_expires_at_ttl_plus_its_own_jitter() -> None:
    offset = jitter("uid-a", SPREAD)
    just_before = idle("a", age=TTL + offset - timedelta(seconds=1), template_hash=HASH)
    at = idle("a", age=TTL + offset, template_hash=HASH)
    assert run([just_before]) == ((), ())
    assert run([at]) == ((Replace("a", REASON),), ())


def test_clock_jump_backwards_delays_rotation() -> None:
    future = idle("a", age=-timedelta(hours=1), template_hash=HASH)
    assert run([future]) == ((), ())
