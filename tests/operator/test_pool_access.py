"""security.py: the agents' token, and the pool's Secret and NetworkPolicy kept applied (issue 8)."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import aiohttp
import pytest
from factories import spec

from tars_contract import contract
from tars_operator import settings
from tars_operator.builders import OperatorDefaults, PoolRef, render
from tars_operator.kubeclient import ApiError, KubeApi
from tars_operator.security import AccessConfig, PoolAccess, agent_token

POOL = PoolRef(name="researcher", namespace="agents", uid="0c8f2e3a-5d1b-4f7e-9a6c-2b4d8e1f3a5c")
KEY = b"operator-key-from-the-charts-secret"
PASSWORD = "default-redis-password"
LABELS = {"app.kubernetes.io/name": "tars-operator", "app.kubernetes.io/component": "operator"}
CONFIG = AccessConfig(
    token_key=KEY,
    redis_password=PASSWORD,
    network_policy=True,
    operator_namespace="tars-system",
    operator_labels=LABELS,
    prometheus_namespaces=("monitoring",),
)
FIELD_MANAGER = "tars-operator"


class FakeApi:
    """Records server-side applies; raises `error` while it is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, dict[str, Any], str]] = []
        self.error: Exception | None = None

    async def _apply(self, kind: str, name: str, namespace: str, body: dict[str, Any], manager: str) -> None:
        if self.error is not None:
            raise self.error
        self.calls.append((kind, name, namespace, body, manager))

    async def apply_namespaced_secret(
        self, name: str, namespace: str, manifest: dict[str, Any], field_manager: str
    ) -> None:
        await self._apply("Secret", name, namespace, manifest, field_manager)

    async def apply_namespaced_network_policy(
        self, name: str, namespace: str, manifest: dict[str, Any], field_manager: str
    ) -> None:
        await self._apply("NetworkPolicy", name, namespace, manifest, field_manager)


def access(api: FakeApi, config: AccessConfig = CONFIG, refresh: float = 60.0) -> PoolAccess:
    return PoolAccess(POOL, config, api, refresh_seconds=refresh)  # type: ignore[arg-type]


def secret_data(manifest: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in manifest["data"].items()}


def test_token_is_stable_per_pool_and_differs_between_pools_and_keys() -> None:
    token = agent_token(KEY, POOL)
    assert len(token) == 64 and int(token, 16) >= 0
    assert agent_token(KEY, PoolRef("researcher", "agents", POOL.uid)) == token  # every replica agrees
    others = [
        agent_token(KEY, PoolRef("researcher", "agents", "another-uid")),  # a recreated pool
        agent_token(KEY, PoolRef("researcher", "other-ns", POOL.uid)),
        agent_token(KEY, PoolRef("writer", "agents", POOL.uid)),
        agent_token(b"another-operator-key", POOL),
    ]
    assert token not in others and len(set(others)) == 4


def test_the_default_redis_password_goes_only_to_pools_that_use_the_default_redis() -> None:
    default_redis = CONFIG.manifests(POOL, spec())
    assert [m["kind"] for m in default_redis] == ["Secret", "NetworkPolicy"]
    assert secret_data(default_redis[0]) == {
        "agent-token": agent_token(KEY, POOL),
        "redis-password": PASSWORD,
    }
    own = CONFIG.manifests(POOL, spec(redis={"url": "redis://mine:6379/0"}))
    assert secret_data(own[0]) == {"agent-token": agent_token(KEY, POOL)}


def test_no_network_policy_unless_enabled() -> None:
    plain = AccessConfig(token_key=KEY)
    assert [m["kind"] for m in plain.manifests(POOL, spec())] == ["Secret"]
    assert "redis-password" not in plain.manifests(POOL, spec())[0]["data"]


def test_secrets_stay_out_of_repr() -> None:
    assert KEY.decode() not in repr(CONFIG) and PASSWORD not in repr(CONFIG)


async def test_ensure_applies_both_objects_server_side_then_only_when_due_or_changed() -> None:
    api = FakeApi()
    pool_access = access(api)
    assert await pool_access.ensure(spec()) == []
    assert [(kind, name, ns, kw) for kind, name, ns, _, kw in api.calls] == [
        ("Secret", "researcher-tars-0c8f2e3a", "agents", FIELD_MANAGER),
        ("NetworkPolicy", "researcher-agents-0c8f2e3a", "agents", FIELD_MANAGER),
    ]
    assert api.calls[0][3] == CONFIG.manifests(POOL, spec())[0]
    assert await pool_access.ensure(spec()) == [] and len(api.calls) == 2  # fresh: no API call
    await pool_access.ensure(spec(redis={"url": "redis://mine:6379/0"}))  # the Secret changes
    assert len(api.calls) == 4 and "redis-password" not in api.calls[2][3]["data"]
    assert await pool_access.ensure(None) == [] and len(api.calls) == 4  # an invalid spec: nothing


async def test_ensure_repairs_after_the_refresh_interval() -> None:
    api = FakeApi()
    pool_access = access(api, refresh=0.0)
    await pool_access.ensure(spec())
    await pool_access.ensure(spec())
    assert [c[0] for c in api.calls] == ["Secret", "NetworkPolicy"] * 2


async def test_a_failed_apply_is_reported_without_the_secret_and_retried() -> None:
    api = FakeApi()
    body = f'{{"data": {{"redis-password": "{PASSWORD}"}}}}'
    api.error = ApiError(403, "Forbidden", body)
    pool_access = access(api)
    errors = await pool_access.ensure(spec())
    assert errors == [
        "applying Secret agents/researcher-tars-0c8f2e3a failed: 403 Forbidden",
        "applying NetworkPolicy agents/researcher-agents-0c8f2e3a failed: 403 Forbidden",
    ]
    assert not any(PASSWORD in e for e in errors)
    api.error = None
    assert await pool_access.ensure(spec()) == [] and len(api.calls) == 2  # retried at once


async def test_a_forbidden_apply_names_the_missing_permission() -> None:
    api = FakeApi()
    message = (
        'secrets "researcher-tars-0c8f2e3a" is forbidden: User "system:serviceaccount:tars-system:t" '
        'cannot patch resource "secrets" in API group "" in the namespace "agents"'
    )
    api.error = ApiError(403, "Forbidden", f'{{"kind": "Status", "message": {json.dumps(message)}}}')
    errors = await access(api, AccessConfig(token_key=KEY)).ensure(spec())
    assert errors == [f"applying Secret agents/researcher-tars-0c8f2e3a failed: 403 Forbidden: {message}"]
    api.error = ApiError(
        422, "Unprocessable Entity", f'{{"kind": "Status", "message": "data: Invalid value: {PASSWORD}"}}'
    )
    errors = await access(api, AccessConfig(token_key=KEY)).ensure(spec())
    assert errors == ["applying Secret agents/researcher-tars-0c8f2e3a failed: 422 Unprocessable Entity"]


def test_config_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.ENV_AGENT_TOKEN_KEY, KEY.decode())
    monkeypatch.setenv(settings.ENV_REDIS_PASSWORD, PASSWORD)
    monkeypatch.setenv("POD_NAMESPACE", "tars-system")
    opts = settings.parse(
        [
            "--network-policy",
            "--operator-pod-labels=app.kubernetes.io/name=tars-operator,app.kubernetes.io/component=operator",
            "--prometheus-namespace=monitoring",
        ]
    )
    assert KEY.decode() not in repr(opts) and PASSWORD not in repr(opts)
    assert AccessConfig.from_settings(opts) == CONFIG


def test_without_a_key_the_operator_uses_a_random_one_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(settings.ENV_AGENT_TOKEN_KEY, raising=False)
    opts = settings.parse([])
    with caplog.at_level(logging.WARNING, logger="tars_operator"):
        first, second = AccessConfig.from_settings(opts), AccessConfig.from_settings(opts)
    assert first.token(POOL) != second.token(POOL)
    assert "TARS_AGENT_TOKEN_KEY is not set" in caplog.text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--network-policy"], "--network-policy needs --operator-pod-labels"),
        (["--operator-pod-labels=app"], "argument --operator-pod-labels: invalid labels value: 'app'"),
    ],
)
def test_network_policy_flags_are_checked(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        settings.parse(argv)
    assert message in capsys.readouterr().err


async def test_the_applies_are_server_side_apply_requests() -> None:
    """Against a stand-in API server: what KubeApi really sends for each object."""
    from aiohttp import web

    seen: list[tuple[str, str, dict[str, str], str, dict[str, Any]]] = []

    async def record(request: web.Request) -> web.Response:
        body = await request.json()
        query = dict(request.query)
        seen.append((request.method, request.path, query, request.headers["Content-Type"], body))
        return web.json_response(body)

    app = web.Application()
    app.router.add_patch("/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    api = KubeApi.at(site.name)
    try:
        pool_access = PoolAccess(POOL, CONFIG, api)
        assert await pool_access.ensure(spec()) == []
    finally:
        await api.close()
        await runner.cleanup()
    secret, policy = CONFIG.manifests(POOL, spec())
    query = {"fieldManager": "tars-operator", "force": "true"}
    assert seen == [
        ("PATCH", "/api/v1/namespaces/agents/secrets/researcher-tars-0c8f2e3a", query,
         "application/apply-patch+yaml", secret),
        ("PATCH", "/apis/networking.k8s.io/v1/namespaces/agents/networkpolicies/researcher-agents-0c8f2e3a",
         query, "application/apply-patch+yaml", policy),
    ]  # fmt: skip


def test_the_pods_env_reads_what_the_secret_holds_and_the_operator_sends() -> None:
    """The three sides agree: the Secret the operator applies, the secretKeyRefs of the agent pod
    it renders, and the token its AgentClient sends (CONFIG.token)."""
    secret = CONFIG.manifests(POOL, spec())[0]
    defaults = OperatorDefaults(
        redis_url="redis://r:6379/0", redis_password=CONFIG.redis_password is not None
    )
    env = {e["name"]: e for e in render(POOL, spec(), None, defaults)["spec"]["containers"][0]["env"]}
    values = {}
    for name in (contract.ENV_AGENT_TOKEN, contract.ENV_REDIS_PASSWORD):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        values[name] = secret_data(secret)[ref["key"]]
    assert values == {contract.ENV_AGENT_TOKEN: CONFIG.token(POOL), contract.ENV_REDIS_PASSWORD: PASSWORD}


async def test_a_dropped_connection_is_reported_like_any_api_failure() -> None:
    # An API server restart surfaces as an aiohttp error that is no OSError: it once escaped
    # ensure() and crashed the pool's loop instead of being reported.
    api = FakeApi()
    api.error = aiohttp.ServerDisconnectedError()
    errors = await access(api, AccessConfig(token_key=KEY)).ensure(spec())
    assert errors == [
        "applying Secret agents/researcher-tars-0c8f2e3a failed: ServerDisconnectedError Server disconnected"
    ]
