"""The operator's own API calls (kopf makes its watches by itself): a dozen REST calls on aiohttp.

Why not a client library: kubernetes_asyncio's generated package imports every model of every
API group, ~60 MB of RSS and ~0.9 s of start-up here (`python -X importtime -c "import kopf"`
with and without it installed), nearly half of what the operator held at 200 agents; kopf imports
it whenever it is installed. lightkube (the light one) cannot delete with a UID precondition nor
patch pods/resize, which the controller relies on. What this module needs is small: JSON in and
out, four patch types, and the credentials kopf's own login functions already parse.

Method names follow `<verb>_namespaced_<kind>[_<subresource>]`, the form e2e/operator_calls.py
reads to derive the RBAC the chart must grant ("apply" = server-side apply: patch and create).
"""

from __future__ import annotations

import datetime as dt
import json
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import kopf

from tars_operator import models

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
# Lists in pod specs (containers) merge by name only in a strategic merge patch.
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"  # JSON is YAML: the API server takes it as is
# A call that gets no answer within this long fails (callers with a deadline of their own wrap
# their calls in asyncio.timeout).
TIMEOUT_S = 30.0
# Connections open at once to the API server. Each TLS connection holds a 256 KiB read buffer of
# asyncio's and OpenSSL's state: with aiohttp's default (100) the 2,000 creates of 100 pools
# left ~100 of them open, ~30 MB of the operator's RSS (bench/README.md operator_scale). The
# leader election has a client of its own, so its Lease is never queued behind them.
CONNECTIONS = 20

Login = Callable[[], kopf.ConnectionInfo | None]


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, body: str = "") -> None:
        self.status = status
        self.reason = reason
        self.body = body  # the server's Status object, as sent
        super().__init__(f"{status} {reason}: {self.message or body[:200]}")

    @property
    def message(self) -> str | None:
        """The Status object's message, which names the cause (None if the body is not one)."""
        try:
            message = json.loads(self.body).get("message")
        except (ValueError, AttributeError):
            return None
        return message if isinstance(message, str) else None


# What an API call can fail with: a refusal, a timeout, or the connection breaking (an API
# server restart surfaces as aiohttp errors that are not OSErrors).
API_ERRORS = (ApiError, TimeoutError, OSError, aiohttp.ClientError)


def micro_time(at: dt.datetime) -> str:
    """The API's MicroTime (RFC 3339 with microseconds), e.g. for a Lease's renewTime."""
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def kube_login(kubeconfig: str | None) -> Login:
    """From the kubeconfig when given (`make run`), else the pod's service account; read again
    at each (re)login, so a rotated service-account token is picked up."""
    settings = kopf.OperatorSettings()
    if kubeconfig:

        def from_kubeconfig() -> kopf.ConnectionInfo | None:
            # kopf's parser reads $KUBECONFIG; main() has pointed it at --kubeconfig.
            return kopf.login_with_kubeconfig(settings=settings)

        return from_kubeconfig
    return lambda: kopf.login_with_service_account(settings=settings)


class KubeApi:
    def __init__(self, login: Login, user_agent: str = "tars-operator") -> None:
        self._login = login
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._server = ""

    @classmethod
    def at(cls, server: str, user_agent: str = "tars-operator") -> KubeApi:
        """Plain HTTP to `server` without credentials (tests' stand-in API servers)."""
        return cls(lambda: kopf.ConnectionInfo(server=server), user_agent)

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            info = self._login()
            if info is None:
                raise kopf.LoginError("no credentials: neither a kubeconfig nor a service account")
            with warnings.catch_warnings():  # aiohttp deprecates BasicAuth on a session; kopf too
                warnings.simplefilter("ignore", DeprecationWarning)
                auth = info.as_aiohttp_basic_auth()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=info.as_ssl_context(), limit=CONNECTIONS),
                headers={**info.as_http_headers(), "User-Agent": self._user_agent},
                auth=auth,
                proxy=info.proxy_url,
                trust_env=info.trust_env,
                timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
            )
            self._server = info.server.rstrip("/")
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = JSON,
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """One call; its JSON answer. A 401 logs in again once (a rotated token), then retries."""
        data = None if body is None else json.dumps(body)
        for attempt in range(2):
            session = self._open()
            async with session.request(
                method,
                self._server + path,
                data=data,
                headers={"Content-Type": content_type} if data is not None else None,
                params=params,
            ) as response:
                text = await response.text()
                if response.status == 401 and attempt == 0:
                    await self.close()
                    continue
                if response.status >= 400:
                    raise ApiError(response.status, response.reason or "", text)
                answer: dict[str, Any] = json.loads(text) if text else {}
                return answer
        raise AssertionError("unreachable: the second attempt returns or raises")

    # Pods: the controller's writes.
    async def create_namespaced_pod(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("POST", f"/api/v1/namespaces/{namespace}/pods", body)

    async def patch_namespaced_pod(
        self, name: str, namespace: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        path = f"/api/v1/namespaces/{namespace}/pods/{name}"
        return await self.request("PATCH", path, body, STRATEGIC_MERGE_PATCH)

    async def patch_namespaced_pod_resize(
        self, name: str, namespace: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        path = f"/api/v1/namespaces/{namespace}/pods/{name}/resize"
        return await self.request("PATCH", path, body, STRATEGIC_MERGE_PATCH)

    async def delete_namespaced_pod(self, name: str, namespace: str, uid: str | None) -> dict[str, Any]:
        """With `uid`, only that pod: never a newer one that reuses the name (409 then)."""
        options: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if uid:
            options["preconditions"] = {"uid": uid}
        return await self.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", options)

    async def patch_namespaced_agent_pool_status(
        self, name: str, namespace: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """A merge patch of the pool's status subresource; the whole pool as written."""
        path = f"/apis/{models.GROUP}/{models.VERSION}/namespaces/{namespace}/{models.PLURAL}/{name}/status"
        return await self.request("PATCH", path, {"status": status}, MERGE_PATCH)

    # Events.
    async def create_namespaced_event(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("POST", f"/api/v1/namespaces/{namespace}/events", body)

    async def patch_namespaced_event(
        self, name: str, namespace: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        path = f"/api/v1/namespaces/{namespace}/events/{name}"
        return await self.request("PATCH", path, body, MERGE_PATCH)

    # The leader election's Lease.
    async def read_namespaced_lease(self, name: str, namespace: str) -> dict[str, Any]:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        return await self.request("GET", path)

    async def create_namespaced_lease(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        return await self.request("POST", path, body)

    async def replace_namespaced_lease(
        self, name: str, namespace: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Fails with 409 unless `body`'s resourceVersion is the stored one."""
        path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        return await self.request("PUT", path, body)

    # A pool's Secret and NetworkPolicy: server-side apply, owned by `field_manager`.
    async def apply_namespaced_secret(
        self, name: str, namespace: str, manifest: Mapping[str, Any], field_manager: str
    ) -> dict[str, Any]:
        path = f"/api/v1/namespaces/{namespace}/secrets/{name}"
        return await self._apply(path, manifest, field_manager)

    async def apply_namespaced_network_policy(
        self, name: str, namespace: str, manifest: Mapping[str, Any], field_manager: str
    ) -> dict[str, Any]:
        path = f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies/{name}"
        return await self._apply(path, manifest, field_manager)

    async def _apply(self, path: str, manifest: Mapping[str, Any], field_manager: str) -> dict[str, Any]:
        # force: the operator owns these objects; a field someone else set is taken back.
        params = {"fieldManager": field_manager, "force": "true"}
        return await self.request("PATCH", path, manifest, APPLY_PATCH, params)
