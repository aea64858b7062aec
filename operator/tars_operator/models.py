"""Pydantic models of the AgentPool API (tars.dev/v1alpha1): the one source of truth.

crd.py turns these models into the CRD's structural schema; the operator validates
every object with them. Cross-field rules appear twice on purpose: as a CEL rule
(`x-kubernetes-validations`, enforced by the API server) and as a model validator
(enforced when the operator or a test parses an object) -- next to each other, so they
are changed together.
"""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from tars_contract import contract
from tars_operator.units import Duration, Quantity

GROUP = "tars.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AgentPool"
PLURAL = "agentpools"
SINGULAR = "agentpool"
SHORT_NAMES = ("ap",)
CATEGORIES = ("tars", "all")

DnsLabel = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", min_length=1, max_length=63)
]
LabelMap = dict[str, Annotated[str, StringConstraints(max_length=63)]]
AnnotationMap = dict[str, Annotated[str, StringConstraints(max_length=4096)]]


def _cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    """One `x-kubernetes-validations` entry; fieldPath makes the error name the field."""
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def _section(cls: type[BaseModel]) -> Any:
    """An optional sub-object whose own field defaults the API server fills in.

    The parent's `default` is the whole defaulted object (not `{}`): the API server
    checks a default against the section's CEL rules before nested defaulting, and a
    rule such as `self.min <= self.max` fails on `{}`. `kubectl get -o yaml` then
    shows every effective value.
    """
    return Field(
        default_factory=cls,
        json_schema_extra=lambda schema: schema.update(
            default=cls().model_dump(by_alias=True, mode="json", exclude_none=True)
        ),
    )


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class _OpenModel(_Model):
    """A Kubernetes object we only partly model: unknown fields are kept, not refused."""

    model_config = ConfigDict(extra="allow")


# --- spec.template: a PodTemplateSpec, typed only as far as the operator reads it ---


class Container(_OpenModel):
    """A container of the agent pod; every other core/v1 Container field is passed through."""

    name: DnsLabel
    image: str = Field(min_length=1, max_length=1024)


class PodSpec(_OpenModel):
    """The pod spec; the first container is the agent the operator configures."""

    containers: list[Container] = Field(min_length=1, max_length=16)


class TemplateMetadata(_OpenModel):
    """Labels and annotations copied onto every agent pod."""

    labels: LabelMap | None = Field(default=None, max_length=64)
    annotations: AnnotationMap | None = Field(default=None, max_length=64)


class PodTemplate(_Model):
    """A core/v1 PodTemplateSpec for the agent pods."""

    metadata: TemplateMetadata | None = None
    spec: PodSpec


# --- the rest of the spec ---


class Replicas(_Model):
    """Bounds on the number of agent pods (a rotation may surge above max by rotation.maxUnavailable)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("self.min <= self.max", "replicas.min must not exceed replicas.max", ".min")
            ]
        }
    )
    min: int = Field(default=1, ge=0, le=1000)
    max: int = Field(default=10, ge=1, le=1000)

    @model_validator(mode="after")
    def _min_le_max(self) -> "Replicas":
        if self.min > self.max:
            raise ValueError("replicas.min must not exceed replicas.max")
        return self


class Warm(_Model):
    """Ready room kept so a new task starts without a cold spawn: `min` agents' worth of free slots."""

    min: int = Field(default=3, ge=0, le=1000)


class QueueDepth(_Model):
    """Queue-driven scale-up: one extra agent per `targetPerAgent` tasks queued above `threshold`."""

    query: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="PromQL returning one number: the tasks waiting for this pool. "
        "Defaults to the sum over priorities of tars_queue_depth{pool=<name>,namespace=<ns>}.",
    )
    threshold: int = Field(default=50, ge=0, le=1_000_000)
    target_per_agent: int = Field(default=10, ge=1, le=1_000_000)


class ScaleDown(_Model):
    """Scale-in follows the highest recommendation seen within the window (like the HPA)."""

    stabilization_window: Duration = Duration("5m")


class Scaling(_Model):
    """How the desired number of agents is computed and how fast it may grow."""

    interval: Duration = Duration("10s")
    queue_depth: QueueDepth = _section(QueueDepth)
    scale_down: ScaleDown = _section(ScaleDown)
    max_spawn_per_interval: int = Field(default=5, ge=1, le=1000)
    on_metrics_unavailable: Literal["Hold", "UseMin"] = "Hold"


class Rotation(_Model):
    """Agents are replaced after `ttl` (plus a per-pod jitter), surge first, drain second."""

    ttl: Duration = Duration("30m")
    max_unavailable: int = Field(default=1, ge=1, le=1000)
    drain_timeout: Duration = Duration("120s")
    jitter: Duration = Duration("3m")


class Memory(_Model):
    """Memory-limit right-sizing of the agent container from observed usage (VPA-like)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "quantity(self.min).compareTo(quantity(self.max)) <= 0",
                    "memory.min must not exceed memory.max",
                    ".min",
                )
            ]
        }
    )
    mode: Literal["Off", "Recommend", "Auto"] = "Recommend"
    # Bounded below the agent's own admission thresholds (contract.py), so the two never fight.
    target_utilization: float = Field(default=0.7, gt=0, le=contract.MAX_MEMORY_TARGET_UTILIZATION)
    min: Quantity = Quantity("128Mi")
    max: Quantity = Quantity("2Gi")
    window: Duration = Duration("1h")

    @model_validator(mode="after")
    def _min_le_max(self) -> "Memory":
        if self.min.bytes > self.max.bytes:
            raise ValueError("memory.min must not exceed memory.max")
        return self


class RateLimit(_Model):
    """The shared LLM budget the agents draw from; pools naming the same budget share it."""

    budget: DnsLabel
    # One definition with the agent (contract.py): every value accepted here, the agent runs.
    requests_per_minute: int | None = Field(
        default=None, ge=contract.MIN_RATE_LIMIT, le=contract.MAX_REQUESTS_PER_MINUTE
    )
    requests_per_hour: int | None = Field(
        default=None, ge=contract.MIN_RATE_LIMIT, le=contract.MAX_REQUESTS_PER_HOUR
    )
    tokens_per_minute: int | None = Field(
        default=None, ge=contract.MIN_RATE_LIMIT, le=contract.MAX_TOKENS_PER_MINUTE
    )


class Queue(_Model):
    """Backpressure: submissions are refused once this many tasks wait."""

    max_depth: int = Field(default=500, ge=1, le=10_000_000)


class SecretKeyRef(_Model):
    """A key of a Secret in the pool's namespace."""

    name: DnsLabel
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")


REDIS_URL_CREDENTIALS = (
    "redis.url must not contain credentials (user:password@): it would be in every agent pod's "
    "environment and in the AgentPool; put the password in a Secret and name it in "
    "redis.passwordSecretRef"
)


class Redis(_Model):
    """The Redis holding the queues and the limiter state (the operator's default when unset).

    Credentials only by Secret reference; `rediss://` for TLS."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [_cel("!self.url.contains('@')", REDIS_URL_CREDENTIALS, ".url")]
        }
    )
    url: str = Field(min_length=1, max_length=1024, pattern=r"^rediss?://")
    password_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="The Redis password: a key of a Secret in the pool's namespace "
        "(agents get it as TARS_REDIS_PASSWORD).",
    )

    @model_validator(mode="after")
    def _no_credentials(self) -> "Redis":
        if "@" in self.url:
            raise ValueError(REDIS_URL_CREDENTIALS)
        return self


class AgentPoolSpec(_Model):
    """Desired state of a pool of LLM agent pods."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "self.warm.min <= self.replicas.max",
                    "warm.min must not exceed replicas.max",
                    ".warm.min",
                )
            ]
        }
    )
    template: PodTemplate
    replicas: Replicas = _section(Replicas)
    warm: Warm = _section(Warm)
    scaling: Scaling = _section(Scaling)
    rotation: Rotation = _section(Rotation)
    memory: Memory = _section(Memory)
    rate_limit: RateLimit | None = None
    queue: Queue = _section(Queue)
    redis: Redis | None = None

    @model_validator(mode="after")
    def _warm_fits(self) -> "AgentPoolSpec":
        if self.warm.min > self.replicas.max:
            raise ValueError("warm.min must not exceed replicas.max")
        return self


# --- status ---

ConditionType = Literal["Ready", "Scaling", "MetricsAvailable", "SpecValid", "BudgetSaturated"]


class Condition(_Model):
    """A metav1.Condition."""

    type: str = Field(min_length=1, max_length=316)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field(default="", max_length=32768)
    last_transition_time: datetime
    observed_generation: int | None = Field(default=None, ge=0)


class AgentPoolStatus(_Model):
    """Observed state, written once per reconcile cycle."""

    observed_generation: int | None = Field(default=None, ge=0)
    selector: str | None = Field(default=None, max_length=1024)
    replicas: int | None = Field(default=None, ge=0)
    ready: int | None = Field(default=None, ge=0)
    warm: int | None = Field(default=None, ge=0)
    busy: int | None = Field(default=None, ge=0)
    draining: int | None = Field(default=None, ge=0)
    unschedulable: int | None = Field(default=None, ge=0)
    queue_depth: int | None = Field(default=None, ge=0)
    queue_depth_sample_time: datetime | None = None
    desired_replicas: int | None = Field(default=None, ge=0)
    last_decision_reason: str | None = Field(default=None, max_length=1024)
    memory_limit: Quantity | None = None
    memory_recommendation: Quantity | None = None
    # When the OOM kill that the last memory bump answered happened: that kill is not
    # answered again (a pod resized in place keeps its OOM record, at its new limit).
    memory_oom_handled: datetime | None = None
    last_scale_time: datetime | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=8,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


class AgentPool(_Model):
    """The whole object, as in a manifest (used to check examples and to read watch events)."""

    api_version: Literal["tars.dev/v1alpha1"]
    kind: Literal["AgentPool"]
    metadata: dict[str, Any]
    spec: AgentPoolSpec
    status: AgentPoolStatus | None = None
