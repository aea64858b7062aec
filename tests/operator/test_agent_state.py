"""Tests of sources.py's reading of the agents' published state (the Redis side is tested against a
real agent and a real Redis in tests/agent/test_agent_state.py)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from factories import raw_spec

from tars_operator import settings
from tars_operator.controller import agent_state_source
from tars_operator.models import AgentPoolSpec
from tars_operator.sources import AgentState, AgentStateReader, parse_agent_state


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"inflight": 3, "draining": false}', AgentState(3, False)),  # an agent before slots
        (b'{"inflight": 3, "draining": false, "slots": 25}', AgentState(3, False, 25)),
        (b'{"inflight": 3, "draining": false, "slots": 0}', None),
        (b'{"inflight": 3, "draining": false, "slots": "25"}', None),
        (b'{"inflight": 3, "draining": false, "slots": true}', None),
        ('{"inflight": 0, "draining": true}', AgentState(0, True)),
        (None, None),  # never published, or expired
        (b"not json", None),
        (b'{"inflight": 3}', None),
        (b'{"inflight": -1, "draining": false}', None),
        (b'{"inflight": true, "draining": false}', None),  # a bool is not a count
        (b'{"inflight": 1.5, "draining": false}', None),
        (b'{"inflight": 1, "draining": "no"}', None),
        (b"[1, 2]", None),
    ],
)
def test_only_a_state_as_the_contract_says_is_taken(
    raw: bytes | str | None, expected: AgentState | None
) -> None:
    assert parse_agent_state(raw) == expected


def test_published_state_is_read_by_default_and_only_for_pools_on_the_default_redis() -> None:
    assert settings.parse([]).agent_state == "redis"
    assert settings.parse(["--agent-state=http"]).agent_state == "http"
    reader = AgentStateReader(aioredis.Redis())  # never connects: only passed around
    on_default = AgentPoolSpec.model_validate(raw_spec())
    own_redis = AgentPoolSpec.model_validate(raw_spec(redis={"url": "redis://elsewhere:6379/0"}))
    assert agent_state_source(on_default, reader) is reader
    assert agent_state_source(own_redis, reader) is None  # its agents publish where we do not read
    assert agent_state_source(None, reader) is None  # an invalid spec: no pods of ours to read
    assert agent_state_source(on_default, None) is None  # --agent-state=http
