"""Tests of events.py: repeats are aggregated like client-go's, the source is tars-operator."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from tars_operator.events import EventRecorder, ObjectRef
from tars_operator.kubeclient import ApiError

POOL = ObjectRef("tars.dev/v1alpha1", "AgentPool", "ns", "pool", "uid-1")


@dataclass
class FakeEvents:
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    fail_patch: list[ApiError] = field(default_factory=list)

    async def create_namespaced_event(self, namespace: str, body: dict[str, Any]) -> Any:
        name = f"{body['metadata']['generateName']}{len(self.stored)}"
        self.stored[name] = dict(body)
        return {"metadata": {"name": name}}

    async def patch_namespaced_event(self, name: str, namespace: str, body: dict[str, Any]) -> None:
        if self.fail_patch:
            raise self.fail_patch.pop(0)
        self.stored[name].update(body)


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


def recorder(events: FakeEvents, clock: Clock) -> EventRecorder:
    return EventRecorder(events, "tars-operator-abc", clock=clock)  # type: ignore[arg-type]


def test_a_repeated_event_is_counted_on_the_first_one_and_comes_from_tars_operator() -> None:
    events, clock = FakeEvents(), Clock()
    rec = recorder(events, clock)

    async def scenario() -> None:
        for _ in range(3):
            await rec.record(POOL, "Warning", "Ready", "2 of 3 agents ready")
            clock.now += dt.timedelta(seconds=5)
        await rec.record(POOL, "Warning", "Ready", "1 of 3 agents ready")  # news: a new Event

    asyncio.run(scenario())
    assert len(events.stored) == 2
    first, second = events.stored.values()
    assert (first["count"], first["lastTimestamp"]) == (3, "2026-01-01T00:00:10Z")
    assert first["firstTimestamp"] == "2026-01-01T00:00:00Z"
    assert first["source"] == {"component": "tars-operator"}
    assert first["reportingComponent"] == "tars-operator"
    assert first["involvedObject"]["uid"] == "uid-1"
    assert second["count"] == 1


def test_a_repeat_after_the_window_or_of_an_expired_event_posts_a_new_one() -> None:
    events, clock = FakeEvents(), Clock()
    rec = recorder(events, clock)

    async def scenario() -> None:
        await rec.record(POOL, "Normal", "ScaledUp", "creating 1")
        clock.now += dt.timedelta(minutes=11)
        await rec.record(POOL, "Normal", "ScaledUp", "creating 1")
        events.fail_patch.append(ApiError(404, "Not Found"))  # the API server expired it
        await rec.record(POOL, "Normal", "ScaledUp", "creating 1")

    asyncio.run(scenario())
    assert [e["count"] for e in events.stored.values()] == [1, 1, 1]


def test_an_event_that_cannot_be_posted_is_logged_not_raised() -> None:
    events, clock = FakeEvents(), Clock()
    rec = recorder(events, clock)

    async def scenario() -> None:
        await rec.record(POOL, "Normal", "ScaledUp", "creating 1")
        events.fail_patch.append(ApiError(403, "Forbidden"))
        await rec.record(POOL, "Normal", "ScaledUp", "creating 1")

    asyncio.run(scenario())
    assert [e["count"] for e in events.stored.values()] == [1]
