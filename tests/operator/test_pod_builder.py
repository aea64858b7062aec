"""Whole-manifest tests of builders.py (kubespawner style)."""

import copy
from typing import Any

from factories import spec

from tars_contract import contract
from tars_operator.builders import (
    OperatorDefaults,
    PoolRef,
    network_policy,
    pool_secret,
    pool_secret_name,
    render,
    template_memory_limit,
    with_replaces,
)

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
                            "name": "TARS_AGENT_TOKEN",
                            "valueFrom": {
                                "secretKeyRef": {"name": "researcher-tars-pool-uid", "key": "agent-token"}
                            },
                        },
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


OWNER = {
    "apiVersion": "tars.dev/v1alpha1",
    "kind": "AgentPool",
    "name": "researcher",
    "uid": "pool-uid",
    "controller": True,
    "blockOwnerDeletion": True,
}
UID = "0c8f2e3a-5d1b-4f7e-9a6c-2b4d8e1f3a5c"


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}


def test_agents_get_the_token_from_the_pools_secret() -> None:
    pool = PoolRef(name="researcher", namespace="agents", uid=UID)
    token = env_of(render(pool, spec(), None, DEFAULTS))[contract.ENV_AGENT_TOKEN]
    assert token == {
        "name": "TARS_AGENT_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "researcher-tars-0c8f2e3a", "key": "agent-token"}},
    }


def test_the_default_redis_password_reaches_agents_of_pools_without_their_own_redis() -> None:
    secured = OperatorDefaults(redis_url="redis://default:6379/0", redis_password=True)
    default_redis = env_of(render(POOL, spec(), None, secured))
    assert default_redis[contract.ENV_REDIS_PASSWORD] == {
        "name": "TARS_REDIS_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": "researcher-tars-pool-uid", "key": "redis-password"}},
    }
    # A pool with its own Redis gets its own Secret's password, never the default one.
    own = env_of(render(POOL, full_spec(), None, secured))[contract.ENV_REDIS_PASSWORD]
    assert own["valueFrom"]["secretKeyRef"] == {"name": "redis", "key": "password"}
    no_password = spec(redis={"url": "redis://mine:6379/0"})
    assert contract.ENV_REDIS_PASSWORD not in env_of(render(POOL, no_password, None, secured))
    assert contract.ENV_REDIS_PASSWORD not in env_of(render(POOL, spec(), None, DEFAULTS))


def test_whole_pool_secret() -> None:
    assert pool_secret(POOL, "tok", "pw") == {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "researcher-tars-pool-uid",
            "namespace": "agents",
            "labels": {"tars.dev/pool": "researcher", "app.kubernetes.io/managed-by": "tars-operator"},
            "ownerReferences": [OWNER],
        },
        "type": "Opaque",
        "data": {"agent-token": "dG9r", "redis-password": "cHc="},
    }
    assert pool_secret(POOL, "tok", None)["data"] == {"agent-token": "dG9r"}


def test_secret_names_of_a_recreated_pool_differ_and_stay_valid() -> None:
    old = PoolRef(name="researcher", namespace="agents", uid=UID)
    new = PoolRef(name="researcher", namespace="agents", uid="7d1e" + UID[4:])
    assert pool_secret_name(old) != pool_secret_name(new)
    long = PoolRef(name="a" * 238 + ".b", namespace="agents", uid=UID)
    name = pool_secret_name(long)
    assert len(name) <= 253 and name.endswith("-tars-0c8f2e3a") and ".-" not in name


def test_whole_network_policy() -> None:
    labels = {"app.kubernetes.io/name": "tars-operator", "app.kubernetes.io/component": "operator"}
    assert network_policy(POOL, "tars-system", labels, ["monitoring", "observability"]) == {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": "researcher-agents-pool-uid",
            "namespace": "agents",
            "labels": {"tars.dev/pool": "researcher", "app.kubernetes.io/managed-by": "tars-operator"},
            "ownerReferences": [OWNER],
        },
        "spec": {
            "podSelector": {"matchLabels": {"tars.dev/pool": "researcher"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "tars-system"}
                            },
                            "podSelector": {"matchLabels": labels},
                        },
                        {
                            "namespaceSelector": {
                                "matchExpressions": [
                                    {
                                        "key": "kubernetes.io/metadata.name",
                                        "operator": "In",
                                        "values": ["monitoring", "observability"],
                                    }
                                ]
                            }
                        },
                    ],
                    "ports": [{"protocol": "TCP", "port": 8080}],
                }
            ],
        },
    }
    only_operator = network_policy(POOL, "tars-system", labels, [])
    assert len(only_operator["spec"]["ingress"][0]["from"]) == 1
