"""Events about a pool, aggregated the way client-go's EventCorrelator does.

kopf.event posts a new Event for every call, from the component "kopf"; a fault that
repeats every cycle then buries the pool's history under copies. Here an Event that
repeats (same object, type, reason and message) within `window` updates the first one's
`count` and `lastTimestamp` -- what `kubectl describe` shows as "(x5 over 3m)" -- and the
source is the operator's own name. Posting never raises: an Event is worth a log line
when it cannot be written, never a failed reconcile.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tars_operator.kubeclient import ApiError, KubeApi

log = logging.getLogger("tars_operator.events")

COMPONENT = "tars-operator"


@dataclass(frozen=True)
class ObjectRef:
    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str


@dataclass
class _Posted:
    name: str
    count: int
    last: dt.datetime


def _stamp(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class EventRecorder:
    kube: KubeApi
    instance: str  # the operator pod's name: reportingInstance
    window: dt.timedelta = dt.timedelta(minutes=10)
    clock: Callable[[], dt.datetime] = field(default=lambda: dt.datetime.now(dt.UTC))
    _posted: dict[tuple[str, str, str, str], _Posted] = field(default_factory=dict)

    async def record(self, ref: ObjectRef, kind: str, reason: str, message: str) -> None:
        now = self.clock()
        # Forget what is past the window, so memory stays bounded by one window of Events.
        self._posted = {k: v for k, v in self._posted.items() if now - v.last < self.window}
        key = (ref.uid, kind, reason, message)
        seen = self._posted.get(key)
        try:
            if seen is not None and await self._repeat(ref.namespace, seen, now):
                return
            created = await self.kube.create_namespaced_event(
                ref.namespace, self._body(ref, kind, reason, message, now)
            )
            self._posted[key] = _Posted(created["metadata"]["name"], 1, now)
        except Exception as exc:  # noqa: BLE001 - an Event must never fail the reconcile
            log.warning(
                "posting Event %s %s about %s/%s failed: %s", kind, reason, ref.namespace, ref.name, exc
            )

    async def _repeat(self, namespace: str, seen: _Posted, now: dt.datetime) -> bool:
        """Count a repeat on the Event already posted; False when that Event is gone (expired)."""
        patch = {"count": seen.count + 1, "lastTimestamp": _stamp(now)}
        try:
            await self.kube.patch_namespaced_event(seen.name, namespace, patch)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        seen.count += 1
        seen.last = now
        return True

    def _body(self, ref: ObjectRef, kind: str, reason: str, message: str, now: dt.datetime) -> dict[str, Any]:
        return {
            "metadata": {"generateName": f"{ref.name}.", "namespace": ref.namespace},
            "involvedObject": {
                "apiVersion": ref.api_version,
                "kind": ref.kind,
                "namespace": ref.namespace,
                "name": ref.name,
                "uid": ref.uid,
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "count": 1,
            "firstTimestamp": _stamp(now),
            "lastTimestamp": _stamp(now),
            "source": {"component": COMPONENT},  # the "From" column of `kubectl describe`
            "reportingComponent": COMPONENT,
            "reportingInstance": self.instance,
        }
