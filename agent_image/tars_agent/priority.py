"""Which priority an agent serves next: smooth weighted round-robin over the non-empty queues.

Under sustained load in every queue, out of every 15 tasks an agent takes 8
critical, 4 high, 2 normal and 1 low, interleaved (nginx's smooth WRR), so
higher priorities go first but low still gets 1/15 of the throughput and is
never starved. An empty queue's share goes to the others (work-conserving),
so with no contention a lone low task runs at once.
"""

from __future__ import annotations

from collections.abc import Mapping

from tars_agent.tasks import PRIORITIES

WEIGHTS: Mapping[str, int] = {"critical": 8, "high": 4, "normal": 2, "low": 1}


class PrioritySelector:
    def __init__(self, weights: Mapping[str, int] = WEIGHTS) -> None:
        if set(weights) != set(PRIORITIES) or min(weights.values()) < 1:
            raise ValueError(
                f"weights must give every priority of {PRIORITIES} a weight >= 1, got {dict(weights)}"
            )
        self._weights = dict(weights)
        self._current = dict.fromkeys(PRIORITIES, 0)

    def choose(self, waiting: Mapping[str, int]) -> str | None:
        """The priority to take the next task from, given how many tasks wait in each."""
        eligible = [p for p in PRIORITIES if waiting.get(p, 0) > 0]
        if not eligible:
            return None
        for p in eligible:
            self._current[p] += self._weights[p]
        # max() keeps the first of equals, and PRIORITIES is ordered: ties go to the higher priority
        best = max(eligible, key=lambda p: self._current[p])
        self._current[best] -= sum(self._weights[p] for p in eligible)
        return best
