"""Tests of validation.py and of the examples against the models."""

from pathlib import Path
from typing import Any

import pytest
import yaml
from factories import raw_spec

from tars_operator.models import AgentPool, AgentPoolSpec
from tars_operator.validation import check, promql_problem

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("agentpool*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    pool = AgentPool.model_validate(yaml.safe_load(path.read_text()))
    spec, problems = check(pool.spec.model_dump(by_alias=True, exclude_none=True))
    assert spec is not None and problems == []


def test_both_examples_exist() -> None:
    assert [p.name for p in EXAMPLES] == ["agentpool-minimal.yaml", "agentpool.yaml"]


AGENT = {"name": "agent", "image": "i"}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"replicas": {"min": 5, "max": 2}}, "spec.replicas"),
        ({"warm": {"min": 11}}, "spec"),
        ({"memory": {"min": "4Gi", "max": "1Gi"}}, "spec.memory"),
        # The agent halves its intake at 80 % of its limit: a target above 75 % would fight it.
        ({"memory": {"targetUtilization": 0.85}}, "spec.memory.targetUtilization"),
        ({"rotation": {"ttl": "30 minutes"}}, "spec.rotation.ttl"),
        ({"template": {"spec": {"containers": []}}}, "spec.template.spec.containers"),
        ({"scaling": {"onMetricsUnavailable": "Guess"}}, "spec.scaling.onMetricsUnavailable"),
        ({"scaling": {"queueDepth": {"query": "sum(tars_queue_depth"}}}, "spec.scaling.queueDepth.query"),
        ({"scaling": {"queueDepth": {"query": "   "}}}, "spec.scaling.queueDepth.query"),
        ({"scaling": {"interval": "0s"}}, "spec.scaling.interval"),
        ({"scaling": {"interval": "10m"}}, "spec.scaling.scaleDown.stabilizationWindow"),
        ({"rotation": {"drainTimeout": "1h"}}, "spec.rotation.drainTimeout"),
        ({"rotation": {"jitter": "40m"}}, "spec.rotation.jitter"),
        ({"rateLimit": {"budget": "b"}}, "spec.rateLimit"),
        # The agent's limiter needs 2 or more (one definition in contract.py): 1 crash-looped agents.
        ({"rateLimit": {"budget": "b", "requestsPerMinute": 1}}, "spec.rateLimit.requestsPerMinute"),
        (
            {"template": {"spec": {"containers": [AGENT, {"name": "agent", "image": "j"}]}}},
            "spec.template.spec.containers",
        ),
        (
            {"template": {"spec": {"containers": [{**AGENT, "env": [{"name": "TARS_POOL", "value": "x"}]}]}}},
            "spec.template.spec.containers[0].env",
        ),
        (
            {
                "template": {
                    "spec": {
                        "containers": [AGENT, {"name": "s", "image": "s", "ports": [{"containerPort": 8080}]}]
                    }
                }
            },
            "spec.template.spec.containers[1].ports",
        ),
        (
            {"template": {"metadata": {"labels": {"tars.dev/pool": "other"}}}},
            "spec.template.metadata.labels",
        ),
        (
            {"template": {"spec": {"containers": [{**AGENT, "resources": {"limits": {"memory": "1e9"}}}]}}},
            "spec.template.spec.containers[0].resources.limits.memory",
        ),
    ],
)
def test_problems_name_the_field(overrides: dict[str, Any], field: str) -> None:
    _, problems = check(raw_spec(**overrides))
    assert problems, "expected a problem"
    assert problems[0].field == field, problems


def test_base_spec_is_valid_and_defaulted() -> None:
    spec, problems = check(raw_spec())
    assert problems == [] and isinstance(spec, AgentPoolSpec)
    assert (spec.rotation.ttl, spec.memory.mode, spec.queue.max_depth) == ("30m", "Recommend", 500)


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ('sum(max by (priority) (tars_queue_depth{pool="a"}))', None),
        ('sum(x{a=")"})', None),  # brackets inside strings do not count
        ("sum(x", "has an unclosed '('"),
        ("x{a='b}", "has an unterminated ' string"),
        ("x])", "has an unmatched ']'"),
        ("42", "names no metric or function"),
    ],
)
def test_promql_problem(query: str, problem: str | None) -> None:
    assert promql_problem(query) == problem
