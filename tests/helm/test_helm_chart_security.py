"""Secure by default (issue 8, items 12 and 13): the chart's Redis requires a password it generates,
the operator gets a key for its agents' tokens, and pools get a NetworkPolicy."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from .conftest import NAMESPACE, Obj, Render, by_kind, one, render_error

FULLNAME = "t-tars-operator"
REDIS = f"{FULLNAME}-redis"
AGENT_AUTH = f"{FULLNAME}-agent-auth"
OPERATOR_LABELS = (
    "app.kubernetes.io/component=operator,app.kubernetes.io/instance=t,app.kubernetes.io/name=tars-operator"
)


def operator_container(objs: list[Obj]) -> Obj:
    container: Obj = one(objs, "Deployment", FULLNAME)["spec"]["template"]["spec"]["containers"][0]
    return container


def redis_container(objs: list[Obj]) -> Obj:
    container: Obj = one(objs, "Deployment", REDIS)["spec"]["template"]["spec"]["containers"][0]
    return container


def env(container: Obj) -> dict[str, Any]:
    return {e["name"]: e.get("valueFrom", e.get("value")) for e in container.get("env", [])}


def secret_ref(name: str, key: str) -> dict[str, Any]:
    return {"secretKeyRef": {"name": name, "key": key}}


def secret_value(secret: Obj, key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


def test_bundled_redis_requires_a_generated_password(render: Render) -> None:
    objs = render({"redis": {"enabled": True}})
    redis = redis_container(objs)
    assert "--protected-mode" not in redis["args"]
    assert redis["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert env(redis) == {"REDIS_PASSWORD": secret_ref(REDIS, "redis-password")}
    secret = one(objs, "Secret", REDIS)
    assert secret["metadata"]["namespace"] == NAMESPACE
    # Kept on uninstall: agents of surviving pools hold this password (so does the reinstall).
    assert secret["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    password = secret_value(secret, "redis-password")
    assert len(password) == 32 and password.isalnum()
    # The operator hands it to pools that use this Redis.
    assert env(operator_container(objs))["TARS_REDIS_PASSWORD"] == secret_ref(REDIS, "redis-password")


def test_an_existing_redis_secret_wins(render: Render) -> None:
    objs = render({"redis": {"enabled": True, "auth": {"existingSecret": "mine", "existingSecretKey": "pw"}}})
    assert [s["metadata"]["name"] for s in by_kind(objs, "Secret")] == [AGENT_AUTH]
    assert env(redis_container(objs))["REDIS_PASSWORD"] == secret_ref("mine", "pw")
    assert env(operator_container(objs))["TARS_REDIS_PASSWORD"] == secret_ref("mine", "pw")


def test_an_external_redis_password_comes_from_a_secret(render: Render) -> None:
    values = {"redisUrl": "rediss://redis.example:6380/0", "redisPasswordSecret": {"name": "ext", "key": "p"}}
    objs = render(values)
    assert env(operator_container(objs))["TARS_REDIS_PASSWORD"] == secret_ref("ext", "p")
    assert "TARS_REDIS_PASSWORD" not in env(operator_container(render()))


@pytest.mark.parametrize("url", ["redis://:s3cret@redis:6379/0", "rediss://user:s3cret@redis.example:6380/0"])
def test_a_redis_url_with_credentials_is_refused(helm: str, tmp_path: Path, url: str) -> None:
    error = render_error(helm, tmp_path, {"redisUrl": url})
    assert "at '/redisUrl'" in error


def test_bundled_redis_over_tls(render: Render) -> None:
    objs = render({"redis": {"enabled": True, "tls": {"enabled": True, "existingSecret": "redis-tls"}}})
    redis = redis_container(objs)
    assert redis["args"] == [
        "--port", "0",
        "--tls-port", "6379",
        "--tls-cert-file", "/tls/tls.crt",
        "--tls-key-file", "/tls/tls.key",
        "--tls-ca-cert-file", "/tls/ca.crt",
        "--tls-auth-clients", "no",
        "--dir", "/data",
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--requirepass", "$(REDIS_PASSWORD)",
    ]  # fmt: skip
    assert {"name": "tls", "mountPath": "/tls", "readOnly": True} in redis["volumeMounts"]
    volumes = one(objs, "Deployment", REDIS)["spec"]["template"]["spec"]["volumes"]
    assert {"name": "tls", "secret": {"secretName": "redis-tls"}} in volumes
    # A TCP probe: a plain Redis PING would be refused on a TLS port.
    assert redis["readinessProbe"] == {"tcpSocket": {"port": "redis"}, "periodSeconds": 5}
    assert f"--redis-url=rediss://{REDIS}.{NAMESPACE}.svc:6379/0" in operator_container(objs)["args"]


def test_tls_needs_its_certificate(helm: str, tmp_path: Path) -> None:
    error = render_error(helm, tmp_path, {"redis": {"enabled": True, "tls": {"enabled": True}}})
    assert "redis.tls.enabled needs redis.tls.existingSecret" in error


def test_the_operator_gets_a_generated_key_for_its_agents_tokens(render: Render) -> None:
    objs = render()
    secret = one(objs, "Secret", AGENT_AUTH)
    assert secret["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    key = secret_value(secret, "token-key")
    assert len(key) == 48 and key.isalnum()
    assert env(operator_container(objs))["TARS_AGENT_TOKEN_KEY"] == secret_ref(AGENT_AUTH, "token-key")


def test_an_existing_agent_auth_secret_wins(render: Render) -> None:
    objs = render({"agentAuth": {"existingSecret": "keys", "existingSecretKey": "k"}})
    assert by_kind(objs, "Secret") == []
    assert env(operator_container(objs))["TARS_AGENT_TOKEN_KEY"] == secret_ref("keys", "k")


def test_pools_get_a_network_policy_admitting_the_operator_and_prometheus(render: Render) -> None:
    objs = render()
    args = operator_container(objs)["args"]
    assert [a for a in args if a.startswith(("--network-policy", "--operator-pod", "--prometheus-ns"))] == [
        "--network-policy",
        f"--operator-pod-labels={OPERATOR_LABELS}",
    ]
    assert "--prometheus-namespace=monitoring" in args
    # The labels the policy admits are the operator pods' own.
    pod_labels = one(objs, "Deployment", FULLNAME)["spec"]["template"]["metadata"]["labels"]
    wanted = dict(pair.split("=") for pair in OPERATOR_LABELS.split(","))
    assert wanted.items() <= pod_labels.items()
    more = operator_container(render({"networkPolicy": {"prometheusNamespaces": ["monitoring", "obs"]}}))
    assert [a for a in more["args"] if a.startswith("--prometheus-namespace")] == [
        "--prometheus-namespace=monitoring",
        "--prometheus-namespace=obs",
    ]


def test_network_policy_off(render: Render) -> None:
    objs = render({"networkPolicy": {"enabled": False}})
    args = operator_container(objs)["args"]
    assert not [a for a in args if a.startswith(("--network-policy", "--operator-pod", "--prometheus-ns"))]
    rules = one(objs, "ClusterRole", FULLNAME)["rules"]
    assert not [r for r in rules if "networkpolicies" in r["resources"]]
