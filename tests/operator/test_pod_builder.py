"""Whole-manifest tests of builders.py (kubespawner style)."""

import copy
from typing import Any

from factories import spec

from tars_agent import contract
from tars_operator.builders import OperatorDefaults, PoolRef, render, template_memory_limit, with_replaces

POOL = PoolRef(name="researcher", namespace="agents", uid="pool-uid", generation=3)
DEFAULTS = OperatorDefaults(redis_url="redis://default:6379/0")


def full_spec() -> Any:
    return spec(
        template={
            "metadata": {"labels": {"team": "r"}, "annotations": {"note": "x"}},
            "spec": {
                "containers": [
                    {
                        "name": "agent",
                        "image": "tars-agent:1",
                        "env": [
                            {"name": "TARS_LLM_MODEL", "value": "m"},
                            {"name": "TARS_POOL", "value": "stale"},
                        ],
                        "resources": {
                            "requests": {"cpu": "100m", "memory": "1Gi"},
                            "limits": {"memory": "2Gi"},
                        },
                    }
                ],
            },
        },
        rotation={"drainTimeout": "90s"},
        rateLimit={"budget": "openai", "requestsPerHour": 10000},
        redis={"url": "redis://r:6379/1", "passwordSecretRef": {"name": "redis", "key": "password"}},
    )


def test_whole_manifest() -> None:
    pod = render(POOL, full_spec(), 512 * 2**20, DEFAULTS)
    digest = pod["metadata"]["labels"].pop(contract.TEMPLATE_HASH_LABEL)
    assert len(digest) == 10
    assert pod == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "researcher-",
            "namespace": "agents",
            "labels": {"team": "r", "tars.dev/pool": "researcher"},
            "annotations": {
                "note": "x",
                "prometheus.io/scrape": "true",
                "prometheus.io/port": "8080",
                "prometheus.io/path": "/metrics",
            },
            "ownerReferences": [
                {
                    "apiVersion": "tars.dev/v1alpha1",
                    "kind": "AgentPool",
                    "name": "researcher",
                    "uid": "pool-uid",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "containers": [
                {
                    "name": "agent",
                    "image": "tars-agent:1",
                    "env": [
                        {"name": "TARS_LLM_MODEL", "value": "m"},
                        {"name": "TARS_POOL", "value": "researcher"},
                        {
                            "name": "TARS_NAMESPACE",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                        },
                        {"name": "TARS_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "TARS_HTTP_PORT", "value": "8080"},
                        {"name": "TARS_QUEUE_MAX_DEPTH", "value": "500"},
                        {"name": "TARS_DRAIN_GRACE_SECONDS", "value": "90"},
                        {"name": "TARS_REDIS_URL", "value": "redis://r:6379/1"},
                        {
                            "name": "TARS_REDIS_PASSWORD",
                            "valueFrom": {"secretKeyRef": {"name": "redis", "key": "password"}},
                        },
                        {"name": "TARS_BUDGET", "value": "openai"},
                        {"name": "TARS_REQUESTS_PER_HOUR", "value": "10000"},
                    ],
                    "resources": {
                        "requests": {"cpu": "100m", "memory": "512Mi"},
                        "limits": {"memory": "512Mi"},
                    },
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8080}, "periodSeconds": 1},
                    "livenessProbe": {
                        "httpGet": {"path": "/healthz", "port": 8080},
                        "periodSeconds": 10,
                        "failureThreshold": 6,
                    },
                    "securityContext": {
                        "runAsNonRoot": True,
                        "readOnlyRootFilesystem": True,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [{"name": "tars-tmp", "mountPath": "/tmp"}],
                }
            ],
            "volumes": [{"name": "tars-tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 90,
        },
    }


def test_template_settings_win_over_defaults() -> None:
    s = spec(
        template={
            "spec": {
                "containers": [
                    {
                        "name": "agent",
                        "image": "i",
                        "securityContext": {"readOnlyRootFilesystem": False, "runAsUser": 1000},
                        "readinessProbe": {"exec": {"command": ["true"]}},
                    },
                    {"name": "sidecar", "image": "s"},
                ],
                "securityContext": {"runAsNonRoot": False},
            }
        }
    )
    pod = render(POOL, s, None, DEFAULTS)
    agent, sidecar = pod["spec"]["containers"]
    assert agent["securityContext"] == {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": False,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsUser": 1000,
    }
    assert "volumeMounts" not in agent and "resources" not in agent
    assert agent["readinessProbe"] == {"exec": {"command": ["true"]}}
    assert sidecar["volumeMounts"] == [{"name": "tars-tmp", "mountPath": "/tmp"}] and "env" not in sidecar
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is False
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env[contract.ENV_REDIS_URL] == "redis://default:6379/0" and contract.ENV_BUDGET not in env


def test_hash_follows_everything_that_shapes_the_pod() -> None:
    s = full_spec()

    def digest(pool_spec: Any, limit: int | None) -> str:
        return str(
            render(POOL, pool_spec, limit, DEFAULTS)["metadata"]["labels"][contract.TEMPLATE_HASH_LABEL]
        )

    base = digest(s, 512 * 2**20)
    assert digest(s, 512 * 2**20) == base
    # The operator's memory limit is resized into running pods, so it must not roll them.
    assert digest(s, 768 * 2**20) == base
    template_limit = s.model_dump(by_alias=True)
    template_limit["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "3Gi"
    assert digest(spec(**template_limit), 512 * 2**20) != base
    assert digest(spec(**{**s.model_dump(by_alias=True), "queue": {"maxDepth": 10}}), 512 * 2**20) != base
    assert digest(spec(**{**s.model_dump(by_alias=True), "warm": {"min": 1}}), 512 * 2**20) == base


def test_with_replaces_copies() -> None:
    pod = render(POOL, full_spec(), None, DEFAULTS)
    before = copy.deepcopy(pod)
    marked = with_replaces(pod, "researcher-old")
    assert marked["metadata"]["annotations"][contract.REPLACES_ANNOTATION] == "researcher-old"
    assert pod == before


def test_template_memory_limit() -> None:
    assert template_memory_limit(full_spec()) == 2 * 2**30
    assert template_memory_limit(spec()) is None


def test_the_agent_gets_its_drain_grace_from_the_pools_drain_timeout() -> None:
    # The agent's own default (30 s) cancelled work after ~27 s of a 120 s drainTimeout.
    for timeout, seconds in (("120s", "120"), ("10s", "10"), ("90s", "90")):
        pod = render(POOL, spec(rotation={"drainTimeout": timeout}), None, OperatorDefaults())
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env[contract.ENV_DRAIN_GRACE_SECONDS] == seconds
        assert pod["spec"]["terminationGracePeriodSeconds"] == int(seconds)
