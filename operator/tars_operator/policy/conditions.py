"""Conditions and the status patch.

Rule: a condition's lastTransitionTime changes only when its status changes (reason and
message may change in between, as metav1.Condition intends); each carries the
generation it was computed for. Conditions of other types already present (written by
someone else) are kept. The status is written whole, at most once per cycle and only when
it changed (controller.says): a merge patch replaces lists anyway, so the conditions list is
always sent complete.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from tars_operator.models import AgentPoolStatus, Condition, ConditionType

Status = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Verdict:
    """A condition as a policy states it, before timestamps."""

    type: ConditionType
    status: Status
    reason: str
    message: str


def merge(
    previous: Sequence[Condition], verdicts: Sequence[Verdict], now: datetime, generation: int
) -> list[Condition]:
    """The new conditions list, in the order of `verdicts`, then any foreign ones."""
    old = {c.type: c for c in previous}
    now = now.replace(microsecond=0)
    merged = []
    for v in verdicts:
        before = old.get(v.type)
        since = before.last_transition_time if before is not None and before.status == v.status else now
        merged.append(
            Condition(
                type=v.type,
                status=v.status,
                reason=v.reason,
                message=v.message[:32768],
                last_transition_time=since,
                observed_generation=generation,
            )
        )
    ours = {v.type for v in verdicts}
    return merged + [c for c in previous if c.type not in ours]


def is_true(conditions: Sequence[Condition], kind: ConditionType) -> bool:
    return any(c.type == kind and c.status == "True" for c in conditions)


def patch(status: AgentPoolStatus) -> dict[str, Any]:
    """The `.status` body for a patch: camelCase, RFC 3339 times, unset fields left out."""
    return status.model_dump(by_alias=True, exclude_none=True, mode="json")
