"""Checks the CRD schema cannot express; each problem names the field it is about.

The API server already refuses what the schema and its CEL rules catch; this module
parses the spec with the same models (so an object stored before a CRD upgrade is still
caught) and adds the semantic checks below. Any problem sets SpecValid=False and the
operator touches no pod of that pool.
"""

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from tars_contract import contract
from tars_operator.builders import OperatorDefaults, PoolRef, operator_env
from tars_operator.models import AgentPoolSpec
from tars_operator.units import parse_quantity

_PAIRS = {")": "(", "]": "[", "}": "{"}


@dataclass(frozen=True)
class Problem:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def promql_problem(query: str) -> str | None:
    """Catch what is obviously broken (Prometheus still has the last word): blank text,
    unbalanced brackets or quotes outside string literals, no metric or function name."""
    if not query.strip():
        return "is blank"
    stack: list[str] = []
    quote: str | None = None
    escaped = False
    for char in query:
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            stack.append(char)
        elif char in _PAIRS and (not stack or stack.pop() != _PAIRS[char]):
            return f"has an unmatched {char!r}"
    if quote:
        return f"has an unterminated {quote} string"
    if stack:
        return f"has an unclosed {stack[-1]!r}"
    if not any(c.isalpha() or c == "_" for c in query):
        return "names no metric or function"
    return None


def _template_problems(spec: AgentPoolSpec) -> list[Problem]:
    problems = []
    containers = spec.template.spec.containers
    for name, n in Counter(c.name for c in containers).items():
        if n > 1:
            problems.append(
                Problem("spec.template.spec.containers", f"container name {name!r} is used {n} times")
            )
    # The env the operator injects depends only on the spec, so a placeholder pool is enough here.
    owned = {e["name"] for e in operator_env(PoolRef("pool", "ns", "uid"), spec, OperatorDefaults())}
    agent = containers[0].model_extra or {}
    for entry in agent.get("env") or []:
        if isinstance(entry, dict) and entry.get("name") in owned:
            problems.append(
                Problem(
                    "spec.template.spec.containers[0].env",
                    f"{entry['name']} is set by the operator from the spec; set the pool field instead",
                )
            )
    for i, container in enumerate(containers[1:], start=1):
        for port in (container.model_extra or {}).get("ports") or []:
            if isinstance(port, dict) and port.get("containerPort") == contract.HTTP_PORT:
                problems.append(
                    Problem(
                        f"spec.template.spec.containers[{i}].ports",
                        f"port {contract.HTTP_PORT} belongs to the agent container",
                    )
                )
    labels = (spec.template.metadata.labels if spec.template.metadata else None) or {}
    for key in (contract.POOL_LABEL, contract.TEMPLATE_HASH_LABEL):
        if key in labels:
            problems.append(Problem("spec.template.metadata.labels", f"{key} is set by the operator"))
    resources = agent.get("resources") or {}
    for kind in ("limits", "requests"):
        value = (resources.get(kind) or {}).get("memory")
        if value is None:
            continue
        try:
            parse_quantity(str(value))
        except ValueError as err:
            problems.append(Problem(f"spec.template.spec.containers[0].resources.{kind}.memory", str(err)))
    return problems


def _timing_problems(spec: AgentPoolSpec) -> list[Problem]:
    problems = []
    interval = spec.scaling.interval.delta
    ttl = spec.rotation.ttl.delta
    if not interval:
        problems.append(Problem("spec.scaling.interval", "must be greater than 0"))
    window = spec.scaling.scale_down.stabilization_window.delta
    if window and window < interval:
        problems.append(
            Problem(
                "spec.scaling.scaleDown.stabilizationWindow",
                f"{window} is shorter than the interval {interval}",
            )
        )
    if not ttl:
        problems.append(Problem("spec.rotation.ttl", "must be greater than 0"))
    drain = spec.rotation.drain_timeout.delta
    if not drain or drain >= ttl:
        problems.append(Problem("spec.rotation.drainTimeout", f"must be > 0 and shorter than the ttl {ttl}"))
    if spec.rotation.jitter.delta >= ttl:
        problems.append(Problem("spec.rotation.jitter", f"must be shorter than the ttl {ttl}"))
    return problems


Checked = tuple[AgentPoolSpec | None, list[Problem]]


def check(raw_spec: Mapping[str, Any]) -> Checked:
    """Parse and check a spec as stored; the spec is None when it does not parse."""
    try:
        spec = AgentPoolSpec.model_validate(raw_spec)
    except ValidationError as err:
        return None, [
            Problem(".".join(["spec", *(str(part) for part in e["loc"])]), e["msg"]) for e in err.errors()
        ]
    problems = _template_problems(spec) + _timing_problems(spec)
    query = spec.scaling.queue_depth.query
    if query is not None and (why := promql_problem(query)):
        problems.append(Problem("spec.scaling.queueDepth.query", why))
    limits = spec.rate_limit
    if limits and not (limits.requests_per_minute or limits.requests_per_hour or limits.tokens_per_minute):
        problems.append(
            Problem(
                "spec.rateLimit", "set at least one of requestsPerMinute, requestsPerHour, tokensPerMinute"
            )
        )
    return spec, problems
