"""Pod actions the policies decide and the shell applies, each with the reason it is logged under."""

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Drain:
    """Annotate the pod draining-since now and POST /drain: it stops taking work."""

    pod: str
    reason: str


@dataclass(frozen=True)
class Delete:
    """Delete the pod (SIGTERM, then terminationGracePeriodSeconds = rotation.drainTimeout)."""

    pod: str
    reason: str


@dataclass(frozen=True)
class Resize:
    """Set the agent container's resources in place, through the pod's `resize` subresource."""

    pod: str
    container: str
    resources: dict[str, Any]
    reason: str
    memory_limit: int  # bytes: what the pod shows once the resize is done
