"""The budget the multi-process limiter test hammers (shared by the test and its subprocesses)."""

from __future__ import annotations

from tars_agent.gcra import LimitParams
from tars_agent.limiter import Budget

WINDOW_US = 1_000_000
REQUESTS = LimitParams("rps", 40, WINDOW_US, 4)
TOKENS = LimitParams("tps", 500, WINDOW_US, 50, "tokens")


def hammer_budget(name: str) -> Budget:
    return Budget(name, (REQUESTS, TOKENS))
