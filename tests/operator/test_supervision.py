"""Tests of supervision.py: a pool loop survives any crash of a step, reports it, and backs off."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tars_operator.supervision import Backoff, supervise


def test_a_crashing_step_is_reported_and_retried_with_a_growing_then_reset_backoff() -> None:
    # What once ended a pool's loop for good: httpx.InvalidURL (an IPv6 pod IP) is no HTTPError.
    script: list[Exception | None] = [httpx.InvalidURL("IPv6"), KeyError("ip"), None, ValueError("x"), None]
    crashes: list[tuple[str, float]] = []
    slept: list[float] = []

    async def step() -> None:
        outcome = script.pop(0)
        if outcome is not None:
            raise outcome
        if not script:
            raise asyncio.CancelledError  # the pool was deleted: the only way out

    async def sleep(delay: float) -> None:
        slept.append(delay)

    async def on_crash(exc: Exception, delay: float) -> None:
        crashes.append((type(exc).__name__, delay))

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(supervise(step, on_crash, Backoff(initial=1.0, cap=60.0), sleep))
    assert crashes == [("InvalidURL", 1.0), ("KeyError", 2.0), ("ValueError", 1.0)]
    assert slept == [1.0, 2.0, 1.0]


def test_the_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(initial=1.0, cap=10.0)
    assert [backoff.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
