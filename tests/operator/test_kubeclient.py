"""kubeclient.py against a stand-in API server: what goes on the wire, errors, a rotated token.

The e2e suite makes the same calls against the real API server under the chart's RBAC; here
each request's method, path, content type and body are checked one by one, and faults that a
real server only shows rarely (a token rotated under a running operator) are injected.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
import pytest
from aiohttp import web

from tars_operator.kubeclient import CONNECTIONS, ApiError, KubeApi, kube_login

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    content_type: str | None
    body: Any
    authorization: str | None


@dataclass
class StandIn:
    """Answers every request with `answers[0]` (status, JSON body), or 200 and the request's body."""

    url: str = ""
    seen: list[Recorded] = field(default_factory=list)
    answers: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    accepted_token: str | None = None  # when set, any other bearer token gets 401
    peers: set[Any] = field(default_factory=set)  # the clients' connections (address, port)

    async def handle(self, request: web.Request) -> web.Response:
        self.peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        text = await request.text()
        body = json.loads(text) if text else None
        auth = request.headers.get("Authorization")
        self.seen.append(
            Recorded(
                request.method,
                request.path,
                dict(request.query),
                request.content_type if text else None,
                body,
                auth,
            )
        )
        if self.accepted_token is not None and auth != f"Bearer {self.accepted_token}":
            return web.json_response(_status(401, "Unauthorized"), status=401)
        if self.answers:
            status, answer = self.answers.pop(0)
            return web.json_response(answer, status=status)
        return web.json_response(body or {"kind": "Status", "status": "Success"})


def _status(code: int, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "message": message}


@pytest.fixture
async def server() -> AsyncIterator[StandIn]:
    stand_in = StandIn()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stand_in.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stand_in.url = site.name
    yield stand_in
    await runner.cleanup()


@pytest.fixture
async def kube(server: StandIn) -> AsyncIterator[KubeApi]:
    api = KubeApi.at(server.url)
    yield api
    await api.close()


async def test_the_controllers_writes_go_out_as_the_api_expects(server: StandIn, kube: KubeApi) -> None:
    await kube.create_namespaced_pod("ns", {"metadata": {"generateName": "p-"}})
    await kube.patch_namespaced_pod("p-1", "ns", {"metadata": {"annotations": {"a": "b"}}})
    resize = {"spec": {"containers": [{"name": "agent", "resources": {"limits": {"memory": "1Gi"}}}]}}
    await kube.patch_namespaced_pod_resize("p-1", "ns", resize)
    await kube.delete_namespaced_pod("p-1", "ns", "uid-1")
    await kube.patch_namespaced_agent_pool_status("pool", "ns", {"desiredReplicas": 3})
    wire = [(r.method, r.path, r.content_type, r.body) for r in server.seen]
    assert wire == [
        ("POST", "/api/v1/namespaces/ns/pods", "application/json", {"metadata": {"generateName": "p-"}}),
        # A strategic merge: a merge patch would replace the pod's whole container list.
        ("PATCH", "/api/v1/namespaces/ns/pods/p-1", "application/strategic-merge-patch+json",
         {"metadata": {"annotations": {"a": "b"}}}),
        ("PATCH", "/api/v1/namespaces/ns/pods/p-1/resize", "application/strategic-merge-patch+json", resize),
        # Only the pod observed: never a newer one that took its name.
        ("DELETE", "/api/v1/namespaces/ns/pods/p-1", "application/json",
         {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": "uid-1"}}),
        ("PATCH", "/apis/tars.dev/v1alpha1/namespaces/ns/agentpools/pool/status",
         "application/merge-patch+json", {"status": {"desiredReplicas": 3}}),
    ]  # fmt: skip


async def test_an_error_answer_is_an_api_error_that_names_the_cause(server: StandIn, kube: KubeApi) -> None:
    message = 'pods "p-1" is forbidden: User "system:serviceaccount:t:t" cannot delete resource "pods"'
    server.answers = [(403, _status(403, message))]
    with pytest.raises(ApiError) as raised:
        await kube.delete_namespaced_pod("p-1", "ns", None)
    assert (raised.value.status, raised.value.reason, raised.value.message) == (403, "Forbidden", message)
    assert str(raised.value) == f"403 Forbidden: {message}"


async def test_a_rotated_token_is_read_again_after_a_401(server: StandIn, tmp_path: Path) -> None:
    """The kubelet rewrites a projected service-account token before it expires: a long-running
    operator must send the new one, as client-go does, without a restart."""
    token = tmp_path / "token"
    token.write_text("first")

    def login() -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=server.url, token=token.read_text())

    api = KubeApi(login)
    try:
        server.accepted_token = "first"
        await api.read_namespaced_lease("l", "ns")
        token.write_text("second")
        server.accepted_token = "second"
        await api.read_namespaced_lease("l", "ns")
    finally:
        await api.close()
    # The second call meets a 401 with the old token, logs in again and goes through.
    assert [r.authorization for r in server.seen] == ["Bearer first", "Bearer first", "Bearer second"]


async def test_a_token_the_server_keeps_refusing_is_an_error_not_a_loop(server: StandIn) -> None:
    server.accepted_token = "valid"
    api = KubeApi(lambda: kopf.ConnectionInfo(server=server.url, token="revoked"))
    try:
        with pytest.raises(ApiError, match="401"):
            await api.read_namespaced_lease("l", "ns")
    finally:
        await api.close()
    assert len(server.seen) == 2  # the call, and one retry after logging in again


def test_without_credentials_the_error_says_what_is_missing() -> None:
    api = KubeApi(lambda: None)
    with pytest.raises(kopf.LoginError, match="neither a kubeconfig nor a service account"):
        api._open()


def test_the_kubeconfig_login_reads_the_file_named_by_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(
        json.dumps(
            {
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"token": "t0ken"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(config))
    info = kube_login(str(config))()
    assert info is not None and (info.server, info.token) == ("https://127.0.0.1:6443", "t0ken")


def test_the_operator_loads_no_generated_kubernetes_client() -> None:
    """kopf imports kubernetes_asyncio whenever it is installed (~60 MB of RSS, most of the
    operator's memory at 200 agents): nothing the operator installs may bring it back."""
    script = "import sys, tars_operator.__main__; print(sorted({m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO)
    loaded = set(json.loads(out.stdout.replace("'", '"')))
    assert not loaded & {"kubernetes_asyncio", "kubernetes", "pykube"}


async def test_a_burst_of_writes_shares_a_few_connections(server: StandIn, kube: KubeApi) -> None:
    # 100 pools' first cycles create 2,000 pods at once; with aiohttp's default each burst opened
    # 100 connections to the API server, each TLS one holding ~300 KB for as long as it stays open.
    await asyncio.gather(*(kube.create_namespaced_pod("ns", {"n": i}) for i in range(200)))
    assert len(server.seen) == 200
    assert None not in server.peers
    assert len(server.peers) <= CONNECTIONS
