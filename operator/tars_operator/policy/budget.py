"""Budget-aware ceiling: stop adding agents the shared LLM budget cannot feed.

Rule: the budget is *saturated* when its utilisation reaches 95 % or the mean limiter
wait reaches 1 s (agents already queue for tokens: one more agent only waits too).
Utilisation is tars_limiter_budget_utilization: the units the whole budget admitted over
about the last window divided by what it sustains per window, so a budget the pool uses
up reads 1.0 (a little more right after a burst; see agent_image/README.md).
It is *relieved* only when utilisation is below 85 % and the mean wait below 0.25 s;
in between the previous verdict stands (hysteresis, so the pool does not flap around
the threshold). Without limiter data (no agent asked the limiter in the last minute, so
nothing waits for the budget) it is not saturated: the condition says what holds now,
not what held when the pool was last busy. While
saturated, scaling does not grow the pool beyond its current size (see scaling.py);
it never shrinks it for that reason -- removing agents would not return budget.
A pool without `spec.rateLimit` is never saturated.
"""

from dataclasses import dataclass

SATURATED_UTILIZATION = 0.95
RELIEVED_UTILIZATION = 0.85
SATURATED_WAIT_SECONDS = 1.0
RELIEVED_WAIT_SECONDS = 0.25


@dataclass(frozen=True)
class BudgetVerdict:
    saturated: bool
    reason: str
    message: str


def assess(
    has_budget: bool, utilization: float | None, wait_seconds: float | None, was_saturated: bool
) -> BudgetVerdict:
    if not has_budget:
        return BudgetVerdict(False, "NoBudget", "spec.rateLimit is not set")
    numbers = f"utilization={_fmt(utilization, '.0%')} limiterWait={_fmt(wait_seconds, '.2f')}s"
    if utilization is None and wait_seconds is None:
        return BudgetVerdict(
            False, "NoLimiterData", f"no limiter activity: nothing waits for the budget ({numbers})"
        )
    if (utilization is not None and utilization >= SATURATED_UTILIZATION) or (
        wait_seconds is not None and wait_seconds >= SATURATED_WAIT_SECONDS
    ):
        return BudgetVerdict(True, "BudgetExhausted", f"not adding agents the budget cannot feed ({numbers})")
    relieved = (utilization is None or utilization < RELIEVED_UTILIZATION) and (
        wait_seconds is None or wait_seconds < RELIEVED_WAIT_SECONDS
    )
    if relieved:
        return BudgetVerdict(False, "Headroom", f"budget has headroom ({numbers})")
    return BudgetVerdict(was_saturated, "Hysteresis", f"between thresholds; last verdict stands ({numbers})")


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
