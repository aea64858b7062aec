"""Pool loops that cannot die silently.

A pool's loop runs one step after another (observe the agents, maybe reconcile, wait for
a wake-up). A step that raises -- an unexpected answer, a bug, a client error no guard
knew -- is reported (`on_crash`: log, metric, Event) and the loop goes on after a backoff
that doubles up to a cap and starts over after a good step, so a persistent fault neither
stops the pool nor spins. Only cancellation (the pool was deleted, leadership was lost,
shutdown) ends it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn


@dataclass
class Backoff:
    initial: float = 1.0
    cap: float = 60.0
    failures: int = 0

    def next_delay(self) -> float:
        self.failures += 1
        return float(min(self.initial * 2.0 ** (self.failures - 1), self.cap))

    def reset(self) -> None:
        self.failures = 0


async def supervise(
    step: Callable[[], Awaitable[None]],
    on_crash: Callable[[Exception, float], Awaitable[None]],
    backoff: Backoff,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> NoReturn:
    """Run `step` forever; a crash is reported with the delay before the next try."""
    while True:
        try:
            await step()
        except Exception as exc:  # noqa: BLE001 - every crash is reported, then retried
            delay = backoff.next_delay()
            await on_crash(exc, delay)
            await sleep(delay)
        else:
            backoff.reset()
