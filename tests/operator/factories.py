"""Small builders of policy inputs shared by the operator tests."""

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from tars_operator.models import AgentPoolSpec
from tars_operator.policy.observe import PodState

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)

BASE_SPEC: dict[str, Any] = {
    "template": {"spec": {"containers": [{"name": "agent", "image": "tars-agent:test"}]}},
    "replicas": {"min": 1, "max": 10},
    "warm": {"min": 2},
}


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def raw_spec(**overrides: Any) -> dict[str, Any]:
    return merged(BASE_SPEC, overrides)


def spec(**overrides: Any) -> AgentPoolSpec:
    return AgentPoolSpec.model_validate(raw_spec(**overrides))


def pod(name: str, age: timedelta = timedelta(minutes=5), now: datetime = T0, **fields: Any) -> PodState:
    return PodState(name=name, uid=f"uid-{name}", created=now - age, **fields)


def busy(name: str, **fields: Any) -> PodState:
    return pod(name, **({"inflight": 1} | fields))


def idle(name: str, **fields: Any) -> PodState:
    return pod(name, inflight=0, **fields)
