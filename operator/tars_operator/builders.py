"""Pure builder of the agent Pod manifest (kubespawner style: the whole object, in one place).

`render` turns (pool, spec, memory limit, operator defaults) into the full core/v1 Pod the
operator creates; `with_replaces` adds the per-pod rotation annotation. The template hash
label is a digest of everything else in the manifest but the operator's memory limit, so
any change that would give a different pod -- template, env, drain timeout -- rolls the
pool through rotation, while a new memory limit is resized into running pods in place.
Template values win over the operator's defaults, except for what the operator must own:
its env vars, the pool/hash labels, owner reference, and terminationGracePeriodSeconds.
"""

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from tars_agent import contract
from tars_operator import models
from tars_operator.units import format_mebibytes, parse_quantity

TMP_VOLUME = "tars-tmp"
CONTAINER_SECURITY = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}
POD_SECURITY = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


@dataclass(frozen=True)
class PoolRef:
    """Identity of the AgentPool object a plan is for."""

    name: str
    namespace: str
    uid: str
    generation: int = 1


@dataclass(frozen=True)
class OperatorDefaults:
    """Operator-wide settings a pool may override."""

    redis_url: str = "redis://redis:6379/0"


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def termination_grace_seconds(spec: models.AgentPoolSpec) -> int:
    """The pod's SIGTERM grace: the pool's drain timeout (a deleted agent may finish that long)."""
    return math.ceil(spec.rotation.drain_timeout.delta.total_seconds())


def operator_env(
    pool: PoolRef, spec: models.AgentPoolSpec, defaults: OperatorDefaults
) -> list[dict[str, Any]]:
    """The environment the operator owns on the agent container (contract.py names)."""
    redis = spec.redis
    env = [
        _env(contract.ENV_POOL, pool.name),
        _field_env(contract.ENV_NAMESPACE, "metadata.namespace"),
        _field_env(contract.ENV_POD_NAME, "metadata.name"),
        _env(contract.ENV_HTTP_PORT, str(contract.HTTP_PORT)),
        _env(contract.ENV_QUEUE_MAX_DEPTH, str(spec.queue.max_depth)),
        # The agent's SIGTERM grace is the pod's: it keeps the last tenth to hand work back.
        _env(contract.ENV_DRAIN_GRACE_SECONDS, str(termination_grace_seconds(spec))),
        _env(contract.ENV_REDIS_URL, redis.url if redis else defaults.redis_url),
    ]
    if redis and redis.password_secret_ref:
        ref = redis.password_secret_ref
        env.append(
            {
                "name": contract.ENV_REDIS_PASSWORD,
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    if spec.rate_limit:
        limits = spec.rate_limit
        env.append(_env(contract.ENV_BUDGET, limits.budget))
        for name, value in (
            (contract.ENV_REQUESTS_PER_MINUTE, limits.requests_per_minute),
            (contract.ENV_REQUESTS_PER_HOUR, limits.requests_per_hour),
            (contract.ENV_TOKENS_PER_MINUTE, limits.tokens_per_minute),
        ):
            if value is not None:
                env.append(_env(name, str(value)))
    return env


def _secure(container: dict[str, Any]) -> None:
    container["securityContext"] = {**CONTAINER_SECURITY, **container.get("securityContext", {})}
    if container["securityContext"]["readOnlyRootFilesystem"] is True:
        # Python and HTTP clients still need a scratch /tmp on a read-only root.
        mounts = container.setdefault("volumeMounts", [])
        if not any(m.get("mountPath") == "/tmp" for m in mounts):
            mounts.append({"name": TMP_VOLUME, "mountPath": "/tmp"})


def _configure_agent(agent: dict[str, Any], env: list[dict[str, Any]]) -> None:
    owned = {e["name"] for e in env}
    agent["env"] = [e for e in agent.get("env", []) if e.get("name") not in owned] + env
    ports = agent.setdefault("ports", [])
    if not any(p.get("containerPort") == contract.HTTP_PORT for p in ports):
        ports.append({"name": "http", "containerPort": contract.HTTP_PORT, "protocol": "TCP"})
    # Probed every second: the kubelet's first probe comes before the agent listens, and the
    # pool counts an agent as warm only once it is Ready (bench/coldwarm.py: with a 5 s period a
    # new agent took 5.8 s to Ready although it took work after 1.7 s).
    agent.setdefault(
        "readinessProbe",
        {"httpGet": {"path": contract.PATH_READYZ, "port": contract.HTTP_PORT}, "periodSeconds": 1},
    )
    agent.setdefault(
        "livenessProbe",
        {
            "httpGet": {"path": contract.PATH_HEALTHZ, "port": contract.HTTP_PORT},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
    )


def agent_resources(agent: dict[str, Any], memory_limit: int | None) -> dict[str, Any]:
    """The agent container's resources with the operator's memory limit (when it sets one)."""
    resources: dict[str, Any] = copy.deepcopy(agent.get("resources", {}))
    if memory_limit is not None:
        limit = format_mebibytes(memory_limit)
        resources.setdefault("limits", {})["memory"] = limit
        request = resources.setdefault("requests", {}).get("memory")
        # A request above the limit is invalid; keep a smaller request (burstable), else request = limit.
        if request is None or parse_quantity(request) > parse_quantity(limit):
            resources["requests"]["memory"] = limit
    return resources


def template_memory_limit(spec: models.AgentPoolSpec) -> int | None:
    """The agent container's memory limit as the template states it, in bytes."""
    limit = (
        (spec.template.spec.containers[0].model_extra or {})
        .get("resources", {})
        .get("limits", {})
        .get("memory")
    )
    return parse_quantity(str(limit)) if limit is not None else None


def render(
    pool: PoolRef, spec: models.AgentPoolSpec, memory_limit: int | None, defaults: OperatorDefaults
) -> dict[str, Any]:
    """The whole agent Pod, with its template-hash label; the first container is the agent."""
    template = copy.deepcopy(spec.template.model_dump(by_alias=True, exclude_none=True))
    meta = template.get("metadata", {})
    pod_spec = template["spec"]
    _configure_agent(pod_spec["containers"][0], operator_env(pool, spec, defaults))
    for container in pod_spec["containers"]:
        _secure(container)
    if any(m.get("name") == TMP_VOLUME for c in pod_spec["containers"] for m in c.get("volumeMounts", [])):
        pod_spec.setdefault("volumes", []).append({"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}})
    pod_spec["securityContext"] = {**POD_SECURITY, **pod_spec.get("securityContext", {})}
    pod_spec.setdefault("automountServiceAccountToken", False)  # agents never call the API server
    pod_spec["terminationGracePeriodSeconds"] = termination_grace_seconds(spec)
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"{pool.name}-",
            "namespace": pool.namespace,
            "labels": {**meta.get("labels", {}), contract.POOL_LABEL: pool.name},
            "annotations": {
                **meta.get("annotations", {}),
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(contract.HTTP_PORT),
                "prometheus.io/path": contract.PATH_METRICS,
            },
            "ownerReferences": [
                {
                    "apiVersion": models.API_VERSION,
                    "kind": models.KIND,
                    "name": pool.name,
                    "uid": pool.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": pod_spec,
    }
    # The operator's memory limit is left out of the hash: running pods get it by an
    # in-place resize, not by rotation.
    digest = hashlib.sha256(json.dumps(pod, sort_keys=True).encode()).hexdigest()[:10]
    pod["metadata"]["labels"][contract.TEMPLATE_HASH_LABEL] = digest
    agent = pod_spec["containers"][0]
    resources = agent_resources(agent, memory_limit)
    if resources:
        agent["resources"] = resources
    return pod


def with_replaces(pod: dict[str, Any], replaces: str | None) -> dict[str, Any]:
    """A copy of `pod` marked as the rotation replacement of pod `replaces`."""
    out = copy.deepcopy(pod)
    if replaces is not None:
        out["metadata"]["annotations"][contract.REPLACES_ANNOTATION] = replaces
    return out
