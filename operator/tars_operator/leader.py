"""Leader election on a coordination.k8s.io Lease, with a fence on the leader's writes.

kopf's peering pauses lower-priority peers, but peers of equal priority all
freeze (docs/peering.rst), and a Deployment's replicas are all equal. So the
operator elects a leader the way client-go does (leaseDuration > renewDeadline
> retryPeriod):

- The holder renews the Lease every retry period. Updates carry the
  resourceVersion, so of two candidates writing the same version one gets 409.
- A candidate judges another holder's lease by what it observed, on its own
  monotonic clock: it notes when the record (holder, renewTime,
  resourceVersion) last changed, and takes the lease over only once it has seen
  no change for a whole lease duration. renewTime is never compared with the
  local clock, so wall clocks that are off by minutes change nothing.
- The leader's authority, its Fence, lasts until the start of its last
  successful renewal + renewDeadline. That write reached the API server after it
  started, and any candidate observed it later still and then waits a whole
  leaseDuration: so the leader has stopped acting leaseDuration - renewDeadline
  before any other replica can write the Lease. Writes to the cluster ask the
  fence first; hold() returns the moment the fence lapses (or at once when the
  Lease names another holder) so the caller stops everything.
- Every API call has a timeout below the retry period, and any failure (API
  errors, disconnects, timeouts) is one failed try: the next try or the
  deadline decides, never an exception.

Why not kubernetes_asyncio.leaderelection (36.1, when the operator still used that
client): its calls have no timeout, so a hung renewal holds its renew loop past the
renew deadline and its leading task is cancelled only once that call returns; it
catches ApiException only, so an aiohttp disconnect ends run() with an exception; its
deadlines use the wall clock (time.time()), which steps; and it has no fence for
writes to check.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import logging
import math
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from tars_operator import observability
from tars_operator.kubeclient import ApiError, KubeApi, micro_time

log = logging.getLogger("tars_operator.leader")
_T = TypeVar("_T")


@dataclass
class Fence:
    """Whether this replica may still write as the leader: until `valid_until` (time.monotonic())."""

    valid_until: float = -math.inf

    @classmethod
    def unlimited(cls) -> Fence:
        """For a replica that is the only writer (--no-leader-election, tests)."""
        return cls(valid_until=math.inf)

    def holds(self) -> bool:
        """Call right before each write and skip the write when False; a False is counted as fenced."""
        if self.remaining() > 0:
            return True
        observability.LEADER_FENCED_WRITES.inc()
        return False

    def remaining(self) -> float:
        """Seconds of authority left (<= 0: none)."""
        return self.valid_until - time.monotonic()

    def extend_to(self, until: float) -> None:
        self.valid_until = max(self.valid_until, until)

    def revoke(self) -> None:
        self.valid_until = -math.inf


class _Outcome(enum.Enum):
    HELD = "held"  # we wrote the Lease: it is ours
    TAKEN = "taken"  # another holder's lease is live
    RACED = "raced"  # someone wrote the Lease since we read it (409)
    FAILED = "failed"  # no answer in time, or an error


class _Record(NamedTuple):
    """What a candidate watches for change in another holder's Lease."""

    holder: str
    renew_time: str | None
    resource_version: str | None


@dataclass
class LeaderElector:
    api: KubeApi
    namespace: str
    name: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    fence: Fence = field(default_factory=Fence, init=False)
    _observed: _Record | None = field(default=None, init=False)
    _observed_at: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not self.lease_duration > self.renew_deadline > self.retry_period > 0:
            raise ValueError("leader election needs lease duration > renew deadline > retry period > 0")

    @property
    def call_timeout(self) -> float:
        # Below the retry period: a call that hangs gives way to the next try.
        return 0.75 * self.retry_period

    async def acquire(self) -> None:
        """Return once this replica holds the Lease (its fence holds); every failure is retried."""
        log.info(
            "waiting to become leader (lease %s/%s, identity %s)", self.namespace, self.name, self.identity
        )
        while True:
            started = time.monotonic()
            if await self._try(budget=self.retry_period) is _Outcome.HELD:
                self.fence.extend_to(started + self.renew_deadline)
                observability.LEADER.set(1)
                log.info("became leader (identity %s)", self.identity)
                return
            await asyncio.sleep(max(0.0, started + self.retry_period - time.monotonic()))

    async def hold(self) -> None:
        """Renew every retry period; return when leadership is lost, with the fence revoked:
        at the renew deadline if no renewal succeeded by then, at once if another holder is seen."""
        tried = time.monotonic()  # acquire() has just written the Lease
        try:
            while True:
                # Sleep until the next try, but wake at the deadline if it comes first.
                wake = min(tried + self.retry_period, self.fence.valid_until)
                await asyncio.sleep(max(0.0, wake - time.monotonic()))
                if self.fence.remaining() <= 0:
                    log.error("could not renew the lease within %ss: stepping down", self.renew_deadline)
                    return
                tried = time.monotonic()
                # The try ends at the deadline at the latest, however slow the API server is.
                outcome = await self._try(budget=self.fence.remaining())
                if outcome is _Outcome.HELD:
                    self.fence.extend_to(tried + self.renew_deadline)
                elif outcome is _Outcome.TAKEN:
                    holder = self._observed.holder if self._observed else "?"
                    log.error("the lease names %s now: stepping down", holder)
                    return
        finally:
            self.fence.revoke()
            observability.LEADER.set(0)

    async def release(self) -> None:
        """Give the Lease up on a clean shutdown, so a standby takes over at once."""
        self.fence.revoke()  # before the write: once it lands, a standby may act
        observability.LEADER.set(0)
        try:
            async with asyncio.timeout(self.retry_period):
                lease = await self._call(self.api.read_namespaced_lease(self.name, self.namespace))
                spec = lease.get("spec") or {}
                if spec.get("holderIdentity") == self.identity:
                    kept = ("leaseDurationSeconds", "leaseTransitions")
                    released = {**lease, "spec": {k: spec[k] for k in kept if k in spec}}
                    await self._call(self.api.replace_namespaced_lease(self.name, self.namespace, released))
        except Exception as exc:  # noqa: BLE001 - the lease then expires by itself
            log.warning("releasing the lease failed: %r", exc)

    async def _try(self, budget: float) -> _Outcome:
        try:
            async with asyncio.timeout(budget):
                return await self._try_acquire_or_renew()
        except Exception as exc:  # noqa: BLE001 - disconnects, timeouts, 5xx alike: a failed try
            log.warning("leader election: %r", exc)
            return _Outcome.FAILED

    async def _try_acquire_or_renew(self) -> _Outcome:
        try:
            lease = await self._call(self.api.read_namespaced_lease(self.name, self.namespace))
        except ApiError as exc:
            if exc.status != 404:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name},
                "spec": self._spec(None),
            }
            return await self._write(self.api.create_namespaced_lease(self.namespace, body))
        if self._held_elsewhere(lease):
            return _Outcome.TAKEN
        # The read's resourceVersion goes back with it: a write since then answers 409.
        renewed = {**lease, "spec": self._spec(lease)}
        return await self._write(self.api.replace_namespaced_lease(self.name, self.namespace, renewed))

    async def _call(self, call: Awaitable[_T]) -> _T:
        async with asyncio.timeout(self.call_timeout):
            return await call

    async def _write(self, call: Awaitable[object]) -> _Outcome:
        try:
            await self._call(call)
        except ApiError as exc:
            if exc.status == 409:
                return _Outcome.RACED
            raise
        return _Outcome.HELD

    def _held_elsewhere(self, lease: Mapping[str, Any]) -> bool:
        """Whether another holder's lease is live, as observed here (never by its renewTime)."""
        spec = lease.get("spec") or {}
        record = _Record(
            holder=spec.get("holderIdentity") or "",
            renew_time=spec.get("renewTime"),
            resource_version=(lease.get("metadata") or {}).get("resourceVersion"),
        )
        now = time.monotonic()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        if not record.holder or record.holder == self.identity:
            return False
        # A holder that declares a longer lease than ours is given it.
        duration = max(self.lease_duration, spec.get("leaseDurationSeconds") or 0)
        return now <= self._observed_at + duration

    def _spec(self, lease: Mapping[str, Any] | None) -> dict[str, Any]:
        # For people and tools reading the Lease; no decision uses it.
        now = micro_time(dt.datetime.now(dt.UTC))
        transitions = 0
        acquired = now
        spec = (lease or {}).get("spec")
        if spec is not None:
            transitions = spec.get("leaseTransitions") or 0
            if spec.get("holderIdentity") == self.identity and spec.get("acquireTime"):
                acquired = spec["acquireTime"]
            else:
                transitions += 1
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": math.ceil(self.lease_duration),
            "acquireTime": acquired,
            "renewTime": now,
            "leaseTransitions": transitions,
        }
