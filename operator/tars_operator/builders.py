"""Pure builders of what the operator creates for a pool (kubespawner style: whole objects).

`render` turns (pool, spec, memory limit, operator defaults) into the full core/v1 Pod the
operator creates; `with_replaces` adds the per-pod rotation annotation; `pool_secret` and
`network_policy` are the pool's Secret (agent token, default Redis password) and the
NetworkPolicy that lets only the operator and Prometheus reach the agents' port. The template hash
label is a digest of everything else in the manifest but the operator's memory limit, so
any change that would give a different pod -- template, env, drain timeout -- rolls the
pool through rotation, while a new memory limit is resized into running pods in place.
Template values win over the operator's defaults, except for what the operator must own:
its env vars, the pool/hash labels, owner reference, and terminationGracePeriodSeconds.
"""

import base64
import copy
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tars_contract import contract
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
# Keys of the pool's Secret.
SECRET_AGENT_TOKEN = "agent-token"
SECRET_REDIS_PASSWORD = "redis-password"
MANAGED_BY = {"app.kubernetes.io/managed-by": "tars-operator"}


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
    # The default Redis needs a password: agents of pools that name no Redis get it from the
    # pool's Secret (the operator copies it there; a pod cannot read the operator's Secret).
    redis_password: bool = False


def _pool_object_name(pool: PoolRef, kind: str) -> str:
    """<pool>-<kind>-<uid prefix>, a valid name of at most 253 characters: the uid prefix keeps a
    recreated pool's objects clear of the old pool's, which await garbage collection."""
    suffix = f"-{kind}-{pool.uid[:8]}"
    return (pool.name[: 253 - len(suffix)].rstrip("-.") + suffix).rstrip("-.")


def pool_secret_name(pool: PoolRef) -> str:
    return _pool_object_name(pool, "tars")


def network_policy_name(pool: PoolRef) -> str:
    return _pool_object_name(pool, "agents")


def _owner(pool: PoolRef) -> dict[str, Any]:
    return {
        "apiVersion": models.API_VERSION,
        "kind": models.KIND,
        "name": pool.name,
        "uid": pool.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _pool_metadata(pool: PoolRef, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": pool.namespace,
        "labels": {contract.POOL_LABEL: pool.name, **MANAGED_BY},
        "ownerReferences": [_owner(pool)],
    }


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def pool_secret(pool: PoolRef, agent_token: str, redis_password: str | None) -> dict[str, Any]:
    """The pool's Secret: the token its agents require on /status and /drain, and the default
    Redis's password when the pool uses that Redis. It goes with the pool (owner reference)."""
    data = {SECRET_AGENT_TOKEN: agent_token}
    if redis_password is not None:
        data[SECRET_REDIS_PASSWORD] = redis_password
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _pool_metadata(pool, pool_secret_name(pool)),
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def network_policy(
    pool: PoolRef,
    operator_namespace: str,
    operator_labels: Mapping[str, str],
    prometheus_namespaces: Sequence[str],
) -> dict[str, Any]:
    """Ingress to the pool's agents: their HTTP port only, from the operator's pods and from any
    pod in the Prometheus namespaces. Other ingress to the agent pods is refused (kubelet probes
    are not affected). Enforced only by a policy-enforcing CNI."""
    peers: list[dict[str, Any]] = [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": operator_namespace}},
            "podSelector": {"matchLabels": dict(operator_labels)},
        }
    ]
    if prometheus_namespaces:
        peers.append(
            {
                "namespaceSelector": {
                    "matchExpressions": [
                        {
                            "key": "kubernetes.io/metadata.name",
                            "operator": "In",
                            "values": list(prometheus_namespaces),
                        }
                    ]
                }
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _pool_metadata(pool, network_policy_name(pool)),
        "spec": {
            "podSelector": {"matchLabels": {contract.POOL_LABEL: pool.name}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": contract.HTTP_PORT}]}],
        },
    }


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
        _secret_env(contract.ENV_AGENT_TOKEN, pool_secret_name(pool), SECRET_AGENT_TOKEN),
    ]
    if redis and redis.password_secret_ref:
        ref = redis.password_secret_ref
        env.append(_secret_env(contract.ENV_REDIS_PASSWORD, ref.name, ref.key))
    elif redis is None and defaults.redis_password:
        env.append(_secret_env(contract.ENV_REDIS_PASSWORD, pool_secret_name(pool), SECRET_REDIS_PASSWORD))
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
            "ownerReferences": [_owner(pool)],
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
