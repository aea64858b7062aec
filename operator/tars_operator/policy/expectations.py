"""Expectations: no new pod actions while earlier ones are not yet visible.

Rule (as in kube-controller-manager): after the shell creates, drains, deletes or resizes a
pod it records an Expectation; until the watch shows the effect (pod seen / draining or gone /
terminating or gone / the new memory limit or gone), the controller does not act again, so a
slow watch cannot cause duplicate creates, a second victim, or a second resize and Event.
An expectation expires after 5 minutes (a lost event must not freeze the pool). A timestamp
more than 1 minute in the future means our clock went back; it expires too: the worst
outcome is one extra create, which the next scale-in absorbs, while holding would stall the
pool for the size of the jump.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from tars_operator.policy.observe import PodState

TIMEOUT = timedelta(minutes=5)
SKEW = timedelta(minutes=1)

Kind = Literal["create", "drain", "delete", "resize"]


@dataclass(frozen=True)
class Expectation:
    pod: str
    kind: Kind
    at: datetime
    memory_limit: int | None = None  # bytes, what a resize set

    @property
    def holds_scaling(self) -> bool:
        """Creates, drains and deletes change the pool's size; a resize does not."""
        return self.kind != "resize"


def _met(exp: Expectation, pods: dict[str, PodState]) -> bool:
    pod = pods.get(exp.pod)
    if exp.kind == "create":
        return pod is not None
    if exp.kind == "resize":
        return pod is None or pod.deleting or pod.memory_limit == exp.memory_limit
    if exp.kind == "drain":
        return pod is None or pod.draining_since is not None or pod.deleting
    return pod is None or pod.deleting


def outstanding(
    expectations: Iterable[Expectation], pods: Iterable[PodState], now: datetime
) -> tuple[Expectation, ...]:
    """The expectations still unmet and still in force."""
    by_name = {p.name: p for p in pods}
    return tuple(e for e in expectations if not _met(e, by_name) and -SKEW <= now - e.at < TIMEOUT)
