"""handlers.asks_for_a_cycle: which watch events of a pool start a cycle at once; and
handlers.first_cycle_phase: when pools started together fall due."""

from __future__ import annotations

import collections
import uuid
from typing import Any

import pytest

from tars_operator.handlers import asks_for_a_cycle, first_cycle_phase

BEFORE: dict[str, Any] = {
    "metadata": {"generation": 3, "resourceVersion": "100", "labels": {"team": "a"}, "annotations": {}},
    "spec": {"warm": {"min": 2}},
    "status": {"desiredReplicas": 2, "queueDepth": 10},
}


def changed(**parts: Any) -> dict[str, Any]:
    return {**BEFORE, **{k: {**BEFORE[k], **v} for k, v in parts.items()}}


@pytest.mark.parametrize(
    ("after", "wakes"),
    [
        # Our own status write, echoed by the watch: the loop's next due cycle reads it.
        (changed(metadata={"resourceVersion": "101"}, status={"queueDepth": 11}), False),
        # A spec edit bumps the generation.
        (changed(metadata={"generation": 4, "resourceVersion": "102"}, spec={"warm": {"min": 5}}), True),
        (changed(metadata={"labels": {"team": "b"}}), True),
        (changed(metadata={"annotations": {"example.com/owner": "team-b"}}), True),
    ],
)
def test_only_spec_and_metadata_changes_start_a_cycle_at_once(after: dict[str, Any], wakes: bool) -> None:
    assert asks_for_a_cycle(BEFORE, after) is wakes


def test_pools_started_together_fall_due_spread_over_their_interval() -> None:
    interval = 10.0
    uids = [str(uuid.UUID(int=n * 7919)) for n in range(100)]
    # Each loop counts its first cycle as begun first_cycle_phase seconds earlier.
    due_at = [interval - first_cycle_phase(uid, interval) for uid in uids]
    assert all(0 < t <= interval for t in due_at)
    per_second = collections.Counter(int(t) for t in due_at)
    assert len(per_second) == 10 and max(per_second.values()) <= 20, per_second
    assert [first_cycle_phase(uid, interval) for uid in uids[:3]] == [
        first_cycle_phase(uid, interval) for uid in uids[:3]
    ], "fixed by the UID: a restarted loop keeps its place"
