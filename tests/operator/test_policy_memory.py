"""Table-driven tests of policy/memory.py."""

from datetime import timedelta

import pytest
from factories import T0, idle

from tars_operator.models import Memory
from tars_operator.policy.memory import MIN_SAMPLES, decide
from tars_operator.policy.metrics import MemoryUsage
from tars_operator.policy.observe import PodState

MI = 2**20


def usage(p95_mi: float, peak_mi: float | None = None, samples: int = MIN_SAMPLES) -> MemoryUsage:
    return MemoryUsage(p95_mi * MI, (peak_mi if peak_mi is not None else p95_mi) * MI, samples)


FLAT_100 = usage(100)  # p95 100Mi -> 100/0.7 = 142.9 -> 143Mi


def oom(name: str, limit_mi: int, ago: timedelta = timedelta(minutes=2)) -> PodState:
    return idle(name, last_oom=T0 - ago, memory_limit=limit_mi * MI)


@pytest.mark.parametrize(
    ("mode", "template", "applied", "data", "pods", "limit", "rec", "reason"),
    [
        ("Off", 512, None, FLAT_100, [], 512, None, "Off"),
        ("Recommend", 512, None, FLAT_100, [], 512, 143, "Recommend"),
        ("Auto", 512, 512, FLAT_100, [], 143, 143, "Resized"),
        # Too few samples: keep the limit in force.
        ("Auto", 512, 512, usage(100, samples=MIN_SAMPLES - 1), [], 512, None, "NotEnoughData"),
        # No template limit, no data: start safe at memory.max.
        ("Auto", None, None, None, [], 2048, None, "NotEnoughData"),
        # Within hysteresis (+/-): no change.
        ("Auto", None, 150, FLAT_100, [], 150, 143, "WithinHysteresis"),
        ("Auto", None, 130, FLAT_100, [], 130, 143, "WithinHysteresis"),
        # The peak sets a floor: 10 % above the highest usage.
        ("Auto", None, 1000, usage(100, peak_mi=400), [], 440, 440, "Resized"),
        # Bounds.
        ("Auto", None, 1000, usage(10), [], 128, 128, "Resized"),
        ("Auto", None, 512, usage(3000), [], 2048, 2048, "Resized"),
        # OOM at the limit in force: x1.5, even without samples.
        ("Auto", None, 512, None, [oom("a", 512)], 768, 768, "OOMKilled"),
        # OOM at an older, smaller limit: already handled, no second bump.
        ("Auto", None, 768, None, [oom("a", 512)], 768, None, "NotEnoughData"),
        # OOM outside the window is forgotten.
        ("Auto", None, 512, None, [oom("a", 512, ago=timedelta(hours=2))], 512, None, "NotEnoughData"),
        # OOM at max: cannot go higher.
        ("Auto", None, 2048, None, [oom("a", 2048)], 2048, 2048, "OOMKilledAtMax"),
    ],
)
def test_decide(
    mode: str,
    template: int | None,
    applied: int | None,
    data: MemoryUsage | None,
    pods: list[PodState],
    limit: int | None,
    rec: int | None,
    reason: str,
) -> None:
    decision = decide(
        Memory(mode=mode),  # type: ignore[arg-type]
        template * MI if template else None,
        applied * MI if applied else None,
        data,
        pods,
        T0,
    )
    assert (decision.limit, decision.recommendation, decision.reason) == (
        limit * MI if limit else None,
        rec * MI if rec else None,
        reason,
    ), decision.message


def test_decision_carries_the_numbers_behind_it() -> None:
    decision = decide(Memory(mode="Auto"), None, 512 * MI, FLAT_100, [oom("a", 512)], T0)
    assert decision.changed and decision.oom_pod == "a"
    assert (decision.p95, decision.peak, decision.samples) == (100 * MI, 100 * MI, MIN_SAMPLES)
    assert "oomKilled=a" in decision.message and "p95=100Mi" in decision.message


def test_an_oom_kill_is_answered_once_even_when_the_pod_is_resized_in_place() -> None:
    killed = oom("a", 512)
    first = decide(Memory(mode="Auto"), None, 512 * MI, None, [killed], T0)
    assert first.limit == 768 * MI and first.oom_at == killed.last_oom
    # Resized in place, the pod reports the same kill at its new limit: no second bump.
    resized = idle("a", last_oom=killed.last_oom, memory_limit=768 * MI)
    again = decide(Memory(mode="Auto"), None, 768 * MI, None, [resized], T0, oom_handled=first.oom_at)
    assert again.limit == 768 * MI and again.oom_pod is None and not again.changed
    # A new kill at the new limit is answered.
    later = idle("a", last_oom=T0 - timedelta(seconds=10), memory_limit=768 * MI)
    assert (
        decide(Memory(mode="Auto"), None, 768 * MI, None, [later], T0, oom_handled=first.oom_at).limit
        == 1152 * MI
    )


def test_no_lowering_within_the_window_after_an_oom_kill() -> None:
    small = usage(40)
    resized = idle("a", last_oom=T0 - timedelta(minutes=1), memory_limit=768 * MI)
    held = decide(Memory(mode="Auto"), None, 768 * MI, small, [resized], T0, oom_handled=resized.last_oom)
    assert held.limit == 768 * MI and held.reason == "HoldAfterOOMKill"
    later = T0 + timedelta(hours=2)
    lowered = decide(
        Memory(mode="Auto"), None, 768 * MI, small, [resized], later, oom_handled=resized.last_oom
    )
    assert lowered.reason == "Resized" and lowered.limit == 128 * MI
