"""asyncio helpers the agent's parts share."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], *, retry_s: float = 0.1) -> None:
    """Cancel `tasks` and wait until every one has ended, cancelling again those that go on.

    redis-py writes through asyncio.wait_for, which on Python 3.11 (the image's) drops a cancel
    that meets the write's end and returns normally (CPython gh-86296): a loop that lost its
    cancel goes on, and the next cancel reaches it at its next wait. Exceptions are not raised."""
    tasks = list(tasks)
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=retry_s)
    await asyncio.gather(*tasks, return_exceptions=True)
