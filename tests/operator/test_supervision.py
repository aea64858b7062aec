"""Tests of supervision.py: a pool loop survives any crash of a step, reports it, and backs off;
and handlers.stop_pools ends every loop."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tars_operator import handlers
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


def test_stopping_the_pools_ends_a_loop_whose_redis_call_lost_the_cancel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """redis-py writes through asyncio.wait_for, which on Python 3.11 drops a cancel that meets the
    write's end (CPython gh-86296) and returns normally: that step ends, and the loop goes on to
    its next. The operator's shutdown (and a deposed leader's) must still end every pool loop."""
    cancels_lost = 0
    counting = asyncio.Event()  # bound to asyncio.run's loop at its first wait

    async def step() -> None:
        nonlocal cancels_lost
        if cancels_lost:
            await asyncio.Event().wait()  # the next cycle, waiting for its wake-up
        counting.set()
        try:
            await asyncio.Event().wait()  # a queue count in Redis under way at the shutdown
        except asyncio.CancelledError:
            cancels_lost += 1

    async def on_crash(exc: Exception, delay: float) -> None:
        raise AssertionError(f"no step crashes here: {exc!r}")

    async def scenario() -> bool:
        runner = handlers.PoolRunner(uid="u1", body={})
        runner.task = asyncio.create_task(supervise(step, on_crash, Backoff()))
        monkeypatch.setitem(handlers._RUNNERS, ("ns", "pool"), runner)
        await asyncio.wait_for(counting.wait(), 5)  # the first step is in its Redis call
        done, _ = await asyncio.wait({asyncio.create_task(handlers.stop_pools())}, timeout=5)
        runner.task.cancel()  # should the test fail: a second cancel reaches the next cycle's wait
        return bool(done) and runner.task.done()

    assert (asyncio.run(scenario()), cancels_lost) == (True, 1)
