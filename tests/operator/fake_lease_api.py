"""An in-process stand-in for the API server's Lease endpoints, with fault knobs.

It serves GET, POST and PUT of coordination.k8s.io/v1 Leases as the API server
does (resourceVersion conflicts answer 409), keeps an audit of every accepted
write with its holder, and can misbehave: answer 500, hang (never answer),
drop connections without answering, restart (stop and listen again on the same
port, the Leases kept as etcd keeps them), cut one client off (its requests
hang, as on a half-dead connection, while the others' go through), and skew the
renewTime a holder writes, as a holder whose wall clock is off would.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tars_operator.kubeclient import KubeApi

LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"


class Fault(enum.Enum):
    NONE = "none"
    ERROR = "500"
    HANG = "hang"
    DROP = "drop"


@dataclass(frozen=True)
class Write:
    """One write the server accepted: when (this process's monotonic clock) and for whom."""

    at: float
    holder: str
    resource_version: int


@dataclass
class FakeLeaseAPI:
    fault: Fault = Fault.NONE
    # User-Agents whose requests hang whatever the fault (see api_client()).
    partitioned: set[str] = field(default_factory=set)
    # holder identity -> how far its wall clock is off: added to the renewTime it writes.
    skew: dict[str, dt.timedelta] = field(default_factory=dict)
    audit: list[Write] = field(default_factory=list)
    # How many requests met each fault ("partition" for a partitioned caller): tests hold a
    # fault until it was met, instead of for a fixed time.
    met: Counter[str] = field(default_factory=Counter)
    leases: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    port: int = 0
    _version: int = 0
    _runner: web.AppRunner | None = None
    _written: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api_client(self, name: str) -> KubeApi:
        """A client whose requests name it in their User-Agent (for `partitioned`)."""
        return KubeApi.at(self.host, user_agent=name)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(LEASES + "/{name}", self._get)
        app.router.add_post(LEASES, self._create)
        app.router.add_put(LEASES + "/{name}", self._replace)
        # A stop must not wait for hung requests: they die with the server, as in a restart.
        self._runner = web.AppRunner(app, shutdown_timeout=0.05)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def until_written(self, count: int) -> None:
        """Until the audit has `count` writes."""
        while len(self.audit) < count:
            self._written.clear()
            await self._written.wait()

    def overwrite(self, namespace: str, name: str, holder: str) -> None:
        """Write the Lease as another party would (a replica we do not run, a person)."""
        lease = self.leases[(namespace, name)]
        self._store((namespace, name), {**lease, "spec": {**lease["spec"], "holderIdentity": holder}})

    def holder(self, namespace: str, name: str) -> str | None:
        lease = self.leases.get((namespace, name))
        return None if lease is None else lease["spec"].get("holderIdentity")

    async def _misbehave(self, request: web.Request) -> web.Response | None:
        partitioned = request.headers.get("User-Agent") in self.partitioned
        if partitioned or self.fault is not Fault.NONE:
            self.met["partition" if partitioned else self.fault.value] += 1
        if self.fault is Fault.HANG or partitioned:
            await asyncio.sleep(3600)  # a call never answered (cancelled when the server stops)
        if self.fault is Fault.ERROR:
            return web.json_response(_status(500, "InternalError", "etcd is unhappy"), status=500)
        if self.fault is Fault.DROP:
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError  # nothing more is written on a closed connection
        return None

    async def _get(self, request: web.Request) -> web.Response:
        if (failed := await self._misbehave(request)) is not None:
            return failed
        lease = self.leases.get((request.match_info["namespace"], request.match_info["name"]))
        if lease is None:
            return web.json_response(_status(404, "NotFound", "not found"), status=404)
        return web.json_response(lease)

    async def _create(self, request: web.Request) -> web.Response:
        if (failed := await self._misbehave(request)) is not None:
            return failed
        body = await request.json()
        key = (request.match_info["namespace"], body["metadata"]["name"])
        if key in self.leases:
            return web.json_response(_status(409, "AlreadyExists", "already exists"), status=409)
        return web.json_response(self._store(key, body), status=201)

    async def _replace(self, request: web.Request) -> web.Response:
        if (failed := await self._misbehave(request)) is not None:
            return failed
        body = await request.json()
        key = (request.match_info["namespace"], request.match_info["name"])
        current = self.leases.get(key)
        if current is None:
            return web.json_response(_status(404, "NotFound", "not found"), status=404)
        if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            return web.json_response(_status(409, "Conflict", "the object has been modified"), status=409)
        return web.json_response(self._store(key, body))

    def _store(self, key: tuple[str, str], body: dict[str, Any]) -> dict[str, Any]:
        self._version += 1
        spec = body.setdefault("spec", {})
        holder = spec.get("holderIdentity") or ""
        if holder in self.skew and spec.get("renewTime"):
            renewed = dt.datetime.fromisoformat(spec["renewTime"].replace("Z", "+00:00"))
            spec["renewTime"] = (renewed + self.skew[holder]).isoformat()
        body["metadata"]["namespace"] = key[0]
        body["metadata"]["resourceVersion"] = str(self._version)
        body.update(apiVersion="coordination.k8s.io/v1", kind="Lease")
        self.leases[key] = body
        self.audit.append(Write(at=time.monotonic(), holder=holder, resource_version=self._version))
        self._written.set()
        return body


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }
