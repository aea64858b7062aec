"""The pure bucket math of the shared limiter (GCRA), mirrored line by line by limiter_lua.ACQUIRE.

A limit of `limit` units per `window` is a continuously refilling bucket of
`burst` units that refills at (limit - burst) / window. Any interval of length
`window` then admits at most burst + (limit - burst) = limit units, so no
sliding window ever exceeds the limit (a bucket that holds `limit` and refills
at limit/window would admit almost 2x in one window, the fixed-window bug).

State is one integer per limit, the theoretical arrival time `tat` in
microseconds of the server clock: the bucket is full at `tat`, and the units in
use at `now` are (tat - now) / per-unit time. Rounding never lets a window
exceed its limit (increments round up; see tolerance_us), and the retry-after
is exact: the first microsecond at which the same request would be admitted.

The arithmetic is done in IEEE doubles in the same order as the Lua script so
that both agree bit for bit (tests/agent/test_gcra.py checks it against Redis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CRITICAL = "critical"


@dataclass(frozen=True)
class LimitParams:
    """One limit of a budget, in the units the script receives (integers)."""

    name: str  # "rpm", "rph", "tpm" or any test name
    limit: int  # units allowed in any window
    window_us: int
    burst: int  # bucket size, 1 <= burst < limit
    unit: str = "requests"  # "requests" (cost 1 each) or "tokens"
    # Tokens one unit stands for: a token limit that would refill more than one unit per
    # microsecond is counted in blocks (150M tokens/minute: blocks of 3), see `scaled`.
    unit_size: int = 1

    @staticmethod
    def scaled(name: str, tokens: int, window_us: int, burst_fraction: float) -> LimitParams:
        """A token limit in the smallest blocks that keep the refill at most one per microsecond;
        rounding down the limit and up the costs keeps the budget on the safe side."""
        size = max(math.ceil(tokens / window_us), 1)
        limit = tokens // size
        burst = min(max(math.floor(limit * burst_fraction), 1), limit - 1)
        return LimitParams(name, limit, window_us, burst, "tokens", size)

    def units(self, tokens: int) -> int:
        """A cost in this limit's units (blocks rounded up)."""
        return -(-tokens // self.unit_size)

    def __post_init__(self) -> None:
        if self.window_us <= 0:
            raise ValueError(f"limit {self.name}: window must be positive, got {self.window_us} us")
        if not 1 <= self.burst < self.limit:
            raise ValueError(
                f"limit {self.name}: need 1 <= burst < limit, got burst={self.burst} limit={self.limit}"
            )
        if self.limit - self.burst > self.window_us:
            # keeps the rounding slack below one unit per window (see tolerance_us)
            raise ValueError(f"limit {self.name}: refills more than one unit per microsecond")


@dataclass(frozen=True)
class Decision:
    admitted: bool
    retry_after_us: int  # 0 when admitted
    tats: tuple[int, ...]  # state after the decision (unchanged when denied)
    denied_by: int  # index of the limit that needs the longest wait, -1 when admitted
    too_large: bool = False  # the cost exceeds a bucket: waiting will never help


def effective(params: LimitParams, override_limit: int | None) -> tuple[int, int]:
    """(limit, burst) after a tighter limit learned from the upstream; burst shrinks in proportion."""
    if override_limit is None or override_limit >= params.limit:
        return params.limit, params.burst
    limit = max(override_limit, 2)
    burst = max(math.floor(float(params.burst) * float(limit) / float(params.limit)), 1)
    return limit, min(burst, limit - 1)


# float() everywhere: Lua numbers are doubles, and Python's exact int / int would round differently.
def increment_us(cost: int, limit: int, burst: int, window_us: int) -> int:
    return math.ceil(float(cost) * float(window_us) / float(limit - burst))


def tolerance_us(
    limit: int, burst: int, window_us: int, reserve_fraction: float, critical: bool, cost: int = 0
) -> int:
    """How far ahead of now `tat` may run; lower priorities keep `reserve_fraction` of the burst free.

    A lower-priority request larger than the rest of the burst waits for a full bucket instead of
    never fitting (critical still goes first: it needs less room).

    Rounded up so that a request of exactly the burst fits; the slack is under 1 us, less than
    one unit while the refill is at most one unit per microsecond (checked in LimitParams).
    """
    usable = float(burst)
    if not critical:
        usable = min(max(float(burst) * (1.0 - reserve_fraction), float(cost)), float(burst))
    return math.ceil(usable * float(window_us) / float(limit - burst))


def decide(
    tats: tuple[int, ...],
    now_us: int,
    costs: tuple[int, ...],
    limits: tuple[LimitParams, ...],
    overrides: tuple[int | None, ...],
    priority: str,
    reserve_fraction: float,
    pause_until_us: int = 0,
) -> Decision:
    """Admit `costs[i]` units against every limit at once, or none of them."""
    if now_us < pause_until_us:
        return Decision(False, pause_until_us - now_us, tats, -1)
    critical = priority == CRITICAL
    new_tats: list[int] = []
    worst_wait = 0
    worst_index = -1
    too_large = False
    for i, params in enumerate(limits):
        limit, burst = effective(params, overrides[i])
        inc = increment_us(costs[i], limit, burst, params.window_us)
        tau = tolerance_us(limit, burst, params.window_us, reserve_fraction, critical, costs[i])
        if inc > tau:  # more than a full bucket holds for this priority
            too_large = True
        start = max(tats[i], now_us)
        new_tat = start + inc
        wait = new_tat - now_us - tau
        if wait > worst_wait:
            worst_wait = wait
            worst_index = i
        new_tats.append(new_tat)
    if too_large:
        return Decision(False, 0, tats, -1, too_large=True)
    if worst_wait > 0:
        return Decision(False, worst_wait, tats, worst_index)
    return Decision(True, 0, tuple(new_tats), -1)


def reconcile(tat: int, now_us: int, delta: int, params: LimitParams, override_limit: int | None) -> int:
    """Correct a reservation by `delta` units (actual - reserved) once the real usage is known.

    A refund never moves `tat` before now: units that already refilled cannot be given back twice.
    """
    limit, burst = effective(params, override_limit)
    if delta >= 0:
        return max(tat, now_us) + increment_us(delta, limit, burst, params.window_us)
    refund = math.floor(float(-delta) * float(params.window_us) / float(limit - burst))
    return max(tat - refund, now_us)
