"""How the operator secures a pool: the agents' token, the pool's Secret and NetworkPolicy.

The token of a pool is HMAC-SHA256(operator key, "<namespace>/<name>/<uid>"): every operator
replica derives the same token from the key in its own (chart-generated) Secret, so it never
reads a Secret back and needs only create/patch on Secrets. The pool's Secret and NetworkPolicy
are server-side applied (one call creates or repairs each) when the pool's runner starts and
again every `refresh_seconds`, so a deleted or edited object comes back.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tars_operator import builders, models
from tars_operator.kubeclient import API_ERRORS, ApiError, KubeApi
from tars_operator.settings import OperatorSettings

log = logging.getLogger("tars_operator")

FIELD_MANAGER = "tars-operator"


def agent_token(key: bytes, pool: builders.PoolRef) -> str:
    """The bearer token of a pool's agents (a recreated pool, with a new uid, gets a new one)."""
    message = f"{pool.namespace}/{pool.name}/{pool.uid}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class AccessConfig:
    """What the operator needs to secure pools, from its settings (secrets kept out of repr)."""

    token_key: bytes = field(repr=False)
    redis_password: str | None = field(default=None, repr=False)
    network_policy: bool = False
    operator_namespace: str = "default"
    operator_labels: Mapping[str, str] = field(default_factory=dict)
    prometheus_namespaces: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: OperatorSettings) -> AccessConfig:
        key = settings.agent_token_key
        if key is None:
            # `make run` outside the chart: tokens hold until this process exits; agents created
            # by another process keep a token this one cannot derive (their drain times out).
            log.warning(
                "TARS_AGENT_TOKEN_KEY is not set: using a random key for the agents' tokens; "
                "set it (the chart does) so that every operator replica derives the same tokens"
            )
            key = secrets.token_hex(32)
        return cls(
            token_key=key.encode(),
            redis_password=settings.redis_password,
            network_policy=settings.network_policy,
            operator_namespace=settings.operator_namespace,
            operator_labels=dict(settings.operator_pod_labels),
            prometheus_namespaces=settings.prometheus_namespaces,
        )

    def token(self, pool: builders.PoolRef) -> str:
        return agent_token(self.token_key, pool)

    def manifests(self, pool: builders.PoolRef, spec: models.AgentPoolSpec) -> list[dict[str, Any]]:
        """The pool's Secret (the default Redis's password only for a pool that uses that Redis)
        and, when enabled, its NetworkPolicy."""
        password = self.redis_password if spec.redis is None else None
        out = [builders.pool_secret(pool, self.token(pool), password)]
        if self.network_policy:
            out.append(
                builders.network_policy(
                    pool, self.operator_namespace, self.operator_labels, self.prometheus_namespaces
                )
            )
        return out


@dataclass
class PoolAccess:
    """Keeps one pool's Secret and NetworkPolicy applied (server-side apply, refreshed)."""

    pool: builders.PoolRef
    config: AccessConfig
    kube: KubeApi
    refresh_seconds: float = 60.0
    _applied: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)
    _applied_at: float = field(default=float("-inf"), init=False)

    async def ensure(self, spec: models.AgentPoolSpec | None) -> list[str]:
        """Apply the pool's objects if they changed or are due; the errors, one text per object
        (naming it, never its data). An invalid spec (None) creates no pods, so nothing is done."""
        if spec is None:
            return []
        wanted = self.config.manifests(self.pool, spec)
        if wanted == self._applied and time.monotonic() - self._applied_at < self.refresh_seconds:
            return []
        errors = [e for m in wanted if (e := await self._apply(m)) is not None]
        if not errors:
            self._applied, self._applied_at = wanted, time.monotonic()
        return errors

    async def _apply(self, manifest: dict[str, Any]) -> str | None:
        meta = manifest["metadata"]
        name, namespace, kind = meta["name"], meta["namespace"], manifest["kind"]
        try:
            if kind == "Secret":
                await self.kube.apply_namespaced_secret(name, namespace, manifest, FIELD_MANAGER)
            else:
                await self.kube.apply_namespaced_network_policy(name, namespace, manifest, FIELD_MANAGER)
        except ApiError as exc:
            return f"applying {kind} {namespace}/{name} failed: {_api_error(exc)}"
        except API_ERRORS as exc:
            return f"applying {kind} {namespace}/{name} failed: {type(exc).__name__} {exc}"
        return None


def _api_error(exc: ApiError) -> str:
    """Status and reason; for 403/404 (RBAC, a missing namespace) also the server's message, which
    names the cause. Other messages (e.g. 422) may quote the object, i.e. the Secret: left out."""
    detail = f"{exc.status} {exc.reason}"
    if exc.status in (403, 404) and exc.message is not None:
        detail += f": {exc.message[:500]}"
    return detail
