"""Leader election on a coordination.k8s.io Lease.

kopf's peering pauses lower-priority peers, but peers of equal priority all
freeze (docs/peering.rst), and a Deployment's replicas are all equal. So the
operator elects a leader the way client-go does: the holder renews the Lease
every `renew` seconds; a candidate takes it over once `renewTime +
leaseDurationSeconds` has passed; updates carry the resourceVersion, so two
candidates cannot both win. A leader that cannot renew within its lease stops
acting (the process exits and its Deployment restarts it as a candidate).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger("tars_operator.leader")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class LeaderElector:
    api: client.CoordinationV1Api
    namespace: str
    name: str
    identity: str
    lease_seconds: int = 15
    renew_seconds: float = 5.0
    retry_seconds: float = 2.0

    def _spec(self, lease: client.V1Lease | None) -> client.V1LeaseSpec:
        now = _now()
        transitions = 0
        acquired = now
        if lease is not None and lease.spec is not None:
            transitions = lease.spec.lease_transitions or 0
            if lease.spec.holder_identity == self.identity and lease.spec.acquire_time:
                acquired = lease.spec.acquire_time
            else:
                transitions += 1
        return client.V1LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=self.lease_seconds,
            acquire_time=acquired,
            renew_time=now,
            lease_transitions=transitions,
        )

    def _free(self, lease: client.V1Lease) -> bool:
        spec = lease.spec
        if spec is None or not spec.holder_identity or spec.holder_identity == self.identity:
            return True
        if spec.renew_time is None:
            return True
        return _now() > spec.renew_time + dt.timedelta(
            seconds=spec.lease_duration_seconds or self.lease_seconds
        )

    async def try_acquire_or_renew(self) -> bool:
        try:
            lease = await self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(metadata=client.V1ObjectMeta(name=self.name), spec=self._spec(None))
            try:
                await self.api.create_namespaced_lease(self.namespace, body)
            except ApiException as create_exc:
                if create_exc.status == 409:  # another candidate created it first
                    return False
                raise
            return True
        if not self._free(lease):
            return False
        lease.spec = self._spec(lease)
        try:
            await self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as exc:
            if exc.status == 409:  # someone else updated it since we read it
                return False
            raise
        return True

    async def acquire(self) -> None:
        """Wait until this process holds the Lease."""
        log.info(
            "waiting to become leader (lease %s/%s, identity %s)", self.namespace, self.name, self.identity
        )
        while True:
            try:
                if await self.try_acquire_or_renew():
                    log.info("became leader (identity %s)", self.identity)
                    return
            except (ApiException, OSError) as exc:
                log.warning("leader election: %s", exc)
            await asyncio.sleep(self.retry_seconds)

    async def hold(self) -> None:
        """Renew the Lease until renewals fail for a whole lease duration; then return (leadership lost)."""
        last_renewed = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(self.renew_seconds)
            try:
                if await self.try_acquire_or_renew():
                    last_renewed = asyncio.get_running_loop().time()
                    continue
                log.error("lost the lease to another candidate")
                return
            except (ApiException, OSError) as exc:
                log.warning("renewing the lease failed: %s", exc)
            if asyncio.get_running_loop().time() - last_renewed > self.lease_seconds:
                log.error("could not renew the lease for %ss: stepping down", self.lease_seconds)
                return

    async def release(self) -> None:
        """Give the Lease up on a clean shutdown, so a standby takes over at once."""
        try:
            lease = await self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec and lease.spec.holder_identity == self.identity:
                lease.spec = client.V1LeaseSpec(
                    lease_duration_seconds=lease.spec.lease_duration_seconds,
                    lease_transitions=lease.spec.lease_transitions,
                )
                await self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except (ApiException, OSError) as exc:
            log.warning("releasing the lease failed: %s", exc)
