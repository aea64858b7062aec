"""The node agent's pure pod-spec helpers."""

from __future__ import annotations

import sys

import pytest

from tars_localcluster.nodeagent.spec import (
    ConfigError,
    container_argv,
    container_env,
    expand,
    memory_limit_bytes,
    parse_quantity,
    referenced_config,
)

POD = {
    "metadata": {"name": "p1", "namespace": "ns", "uid": "u-1", "labels": {"app": "a"}},
    "spec": {"nodeName": "n0", "serviceAccountName": "default"},
}


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [("128Mi", 128 * 2**20), ("1Gi", 2**30), ("1G", 1e9), ("500m", 0.5), ("64", 64), ("1.5Ki", 1536), (3, 3)],
)
def test_parse_quantity(quantity: str | int, expected: float) -> None:
    assert parse_quantity(quantity) == expected


@pytest.mark.parametrize("bad", ["", "12Xi", "Mi", "1..2"])
def test_parse_quantity_rejects_garbage(bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid quantity"):
        parse_quantity(bad)


def test_memory_limit() -> None:
    assert memory_limit_bytes({"resources": {"limits": {"memory": "64Mi"}}}) == 64 * 2**20
    assert memory_limit_bytes({"resources": {"requests": {"memory": "64Mi"}}}) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("$(A)-$(B)", "1-$(B)"), ("$$(A)", "$(A)"), ("x$(A)y", "x1y"), ("no refs", "no refs")],
)
def test_expand_follows_kubernetes_rules(text: str, expected: str) -> None:
    assert expand(text, {"A": "1"}) == expected


def test_env_order_sources_and_references() -> None:
    container = {
        "name": "c",
        "resources": {"limits": {"memory": "64Mi"}},
        "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
        "env": [
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {
                "name": "MEM_MI",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
            },
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            {"name": "URL", "value": "http://$(IP):80/$(POD)"},
        ],
    }
    config = {(False, "cm"): {"X": "1"}, (True, "s"): {"k": "secret"}}
    env = container_env(POD, container, {"PATH": "/bin"}, config, "10.0.0.1", "10.244.0.9")
    assert env == {
        "PATH": "/bin",
        "CM_X": "1",
        "POD": "p1",
        "IP": "10.244.0.9",
        "APP": "a",
        "MEM_MI": "64",
        "KEY": "secret",
        "URL": "http://10.244.0.9:80/p1",
    }
    assert referenced_config(container) == {(False, "cm"), (True, "s")}


def test_missing_secret_key_names_it() -> None:
    container = {
        "name": "c",
        "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
    }
    with pytest.raises(ConfigError, match="key 'k' of secret 's' not found"):
        container_env(POD, container, {}, {}, "h", "p")
    optional = {
        "name": "c",
        "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k", "optional": True}}}],
    }
    assert container_env(POD, optional, {}, {}, "h", "p") == {}


def test_argv_resolves_commands_on_path_and_expands_args() -> None:
    container = {"name": "c", "command": ["python3"], "args": ["-c", "$(CODE)"]}
    argv = container_argv(container, {"PATH": "/usr/bin:/bin", "CODE": "pass"}, {})
    assert argv[0].endswith("/python3") and argv[1:] == ["-c", "pass"]


def test_argv_maps_images_without_command() -> None:
    container = {"name": "c", "image": "ghcr.io/x/agent:1.2", "args": ["--x"]}
    argv = container_argv(container, {"PATH": ""}, {"ghcr.io/x/agent": [sys.executable, "-m", "agent"]})
    assert argv == [sys.executable, "-m", "agent", "--x"]


def test_argv_errors_name_the_cause() -> None:
    with pytest.raises(ConfigError, match="never pulls images"):
        container_argv({"name": "c", "image": "nginx:1"}, {"PATH": "/bin"}, {})
    with pytest.raises(ConfigError, match="executable 'no-such-program-x' not found"):
        container_argv({"name": "c", "command": ["no-such-program-x"]}, {"PATH": "/bin"}, {})
