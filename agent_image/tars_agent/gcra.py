"""The pure bucket math of the shared limiter (GCRA with reservations), mirrored line by line
by limiter_lua.BATCH.

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

Reservations: a request is not asked "may I go now?" but "when may I go?". Its
slot is the first instant at which GCRA would admit it; the script advances every
bucket's `tat` as if it were admitted at that slot, and the caller sleeps until
then. Requests reserved one after the other get slots in that order (FIFO by
construction), and the window bound holds whatever the slots' order (see
`reserve`). A request whose slot is further ahead than it may wait (its
deadline, or its class's horizon) is refused and charges nothing anywhere.

The arithmetic is done in IEEE doubles in the same order as the Lua script so
that both agree bit for bit (tests/agent/test_gcra.py checks it against Redis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

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


# The default burst of request limits, as a fraction of the limit: one second of a per-minute
# limit. Providers may enforce a minute's limit per second (OpenAI: "60,000 requests/minute may
# be enforced as 1,000 requests/second"), and refuse a larger burst however the minute adds up.
REQUEST_BURST_FRACTION = 1 / 60
# Token limits keep a larger burst: one request's prompt + max_tokens must fit in it.
TOKEN_BURST_FRACTION = 0.05

# How far ahead of now each class may reserve (None: only its deadline bounds it). A class
# can delay the classes above it by at most its own horizon, because a reservation is never
# moved once given: with low saturating the budget, the head of the bucket stays within
# low's horizon (plus the reserve only critical may use) of now, so a critical request
# waits at most about that long. The graded horizons make the limiter a strict priority order
# under saturation: a class is served from what the classes above it leave (README.md).
HORIZON_US: dict[str, int | None] = {"critical": None, "high": 2_000_000, "normal": 1_000_000, "low": 500_000}
# A caller whose slot is this far ahead asks Redis for a budget-wide pause when it wakes, unless
# its limiter's pause subscription covered its sleep (limiter.py): shorter sleeps began after
# any pause older than this and saw it.
CONFIRM_AFTER_US = 100_000


# A caller back with its ticket may reserve this share of its horizon beyond it. A newcomer that
# asks in the instant before a ticket's holder comes back takes the slot the ticket named; without
# the slack the holder, and after it every later holder, would be refused once and come back
# (two script calls each while the queue lasts). With it, higher classes wait for a lower class's
# returning callers at most its horizon x (1 + RETURN_SLACK).
RETURN_SLACK = 0.2


def max_ahead_us(priority: str, remaining_us: int, returning: bool = False) -> int:
    """How far ahead of now a request of `priority` may be given a slot (`returning`: it holds a
    ticket)."""
    horizon = HORIZON_US[priority]
    if horizon is None:
        return remaining_us
    if returning:
        horizon += int(horizon * RETURN_SLACK)
    return min(remaining_us, horizon)


@dataclass(frozen=True)
class Limits:
    """A budget's limits with its tighter upstream overrides applied: what one batch decides on."""

    params: tuple[LimitParams, ...]
    overrides: tuple[int | None, ...]
    reserve_fraction: float

    def effective(self, i: int) -> tuple[int, int]:
        return effective(self.params[i], self.overrides[i])

    def tolerance(self, i: int, critical: bool, cost: int = 0) -> int:
        limit, burst = self.effective(i)
        return tolerance_us(limit, burst, self.params[i].window_us, self.reserve_fraction, critical, cost)

    def increment(self, i: int, cost: int) -> int:
        limit, burst = self.effective(i)
        return increment_us(cost, limit, burst, self.params[i].window_us)


def fresh_tat(limits: Limits, i: int, now_us: int) -> int:
    """The `tat` of a bucket with no state (a cold start, or unused for a whole window).

    It starts with room for half its burst (at least one unit), not full: nothing tells how
    much of the upstream's own bucket is left, and requests admitted together reach a strict
    upstream spread by network and scheduling jitter; half a burst of slack absorbs that.
    """
    _limit, burst = limits.effective(i)
    room = max(burst // 2, 1)
    full = limits.tolerance(i, True)
    return max(now_us + full - limits.increment(i, room), now_us)


@dataclass(frozen=True)
class Verdict:
    """The answer to one reservation request."""

    admitted: bool
    slot_us: int  # the reserved start (admitted), or the start it would have had (refused)
    tats: tuple[int, ...]  # the buckets after this request (unchanged when refused)
    limiting: int  # index of the limit that set the slot, -1 when none had to wait
    too_large: bool = False  # the cost exceeds a bucket for this class: waiting never helps


def reserve(
    tats: tuple[int, ...],
    now_us: int,
    costs: tuple[int, ...],
    limits: Limits,
    critical: bool,
    max_ahead: int,
    pause_until_us: int = 0,
) -> Verdict:
    """Reserve `costs[i]` units of every limit at the earliest slot, or nothing.

    The slot is the earliest s >= now at which GCRA admits the request in every bucket:
    max(tat_i, s) + inc_i - s <= tau_i, i.e. s >= tat_i + inc_i - tau_i. Each bucket then
    advances to max(tat_i, slot) + inc_i. Window bound, whatever the order of slots: the
    request occupies [max(tat_i, slot), new_tat_i) of tat-time; these intervals never overlap,
    start at or after the slot and end by slot + tau_i, so the requests with slots in a closed
    window [t, t + W] occupy at most W + tau_i of tat-time: at most L units.
    """
    slot = max(now_us, pause_until_us)
    limiting = -1
    too_large = False
    incs: list[int] = []
    for i in range(len(tats)):
        inc = limits.increment(i, costs[i])
        tau = limits.tolerance(i, critical, costs[i])
        if inc > tau:
            too_large = True
        earliest = tats[i] + inc - tau
        if earliest > slot:
            slot = earliest
            limiting = i
        incs.append(inc)
    if too_large:
        return Verdict(False, now_us, tats, -1, too_large=True)
    if slot - now_us > max_ahead:
        return Verdict(False, slot, tats, limiting)
    return Verdict(True, slot, tuple(max(t, slot) + inc for t, inc in zip(tats, incs, strict=True)), limiting)


# A lease: `granted` admissions of `costs` each, charged in the shared buckets at once and spent by
# one process without a script call while the budget is ample (limiter.py). Its admissions may start
# anywhere in [grant, grant + lease_us]: each bucket advances from grant + lease_us, and the lease must
# end within half the non-critical tolerance of the grant. So every admission's share of tat-time
# lies in [start, start + tau], as a reservation's does (see `reserve`): no closed window exceeds the
# limit whenever within its life the lease is spent; and after the grant every class still finds
# half its usable burst free, so a lease never delays a reservation of any class. Fewer than
# LEASE_MIN admissions are no lease (a reservation costs less).
LEASE_MIN = 2


def lease(
    tats: tuple[int, ...], now_us: int, costs: tuple[int, ...], limits: Limits, wanted: int, lease_us: int
) -> tuple[int, tuple[int, ...]]:
    """The admissions granted (at most `wanted`; 0: none) and the buckets after them."""
    granted = wanted
    incs: list[int] = []
    for i in range(len(tats)):
        inc = limits.increment(i, costs[i])
        if inc > 0:
            start = max(tats[i], now_us + lease_us)
            half = math.floor(float(limits.tolerance(i, False, costs[i])) / 2.0)
            granted = min(granted, math.floor(float(now_us + half - start) / float(inc)))
        incs.append(inc)
    if granted < LEASE_MIN:
        return 0, tats
    return granted, tuple(
        max(t, now_us + lease_us) + granted * inc if inc > 0 else t for t, inc in zip(tats, incs, strict=True)
    )


def give_back(
    tats: tuple[int, ...], reserved: tuple[int, ...], costs: tuple[int, ...], limits: Limits
) -> tuple[int, ...]:
    """Undo a reservation in every bucket where it is still the head (the last one reserved).

    Where a later reservation followed it, its slot stays taken: moving the later ones forward
    would break their promised start, and lowering `tat` under them would let a window
    exceed the limit. The budget then under-uses that slot, never over-admits.
    """
    return tuple(
        t - limits.increment(i, costs[i]) if t == r else t
        for i, (t, r) in enumerate(zip(tats, reserved, strict=True))
    )


def charge(tat: int, now_us: int, units: int, limits: Limits, i: int) -> int:
    """Charge `units` more to bucket i now (usage above the reservation, or local admissions)."""
    return max(tat, now_us) + limits.increment(i, units)


def empty(tat: int, now_us: int, limits: Limits, i: int) -> int:
    """The upstream says this bucket is empty (a 429, or remaining: 0): so is ours, from now."""
    return max(tat, now_us + limits.tolerance(i, True))


def decay(used: float, since_us: int, now_us: int, window_us: int) -> float:
    """The exponentially weighted units admitted, aged from `since_us` to `now_us`
    (time constant: the window)."""
    return used * math.exp(-float(max(now_us - since_us, 0)) / float(window_us))


def utilization(used: float, limits: Limits, i: int) -> float:
    """Units admitted over about the last window, as a share of what the bucket sustains per window.

    GCRA sustains (L - B) units per window after its first burst, so a saturated budget reads
    1.0 (a little above right after a burst).
    """
    limit, burst = limits.effective(i)
    return used / float(limit - burst)


def reconcile(tat: int, now_us: int, delta: int, params: LimitParams, override_limit: int | None) -> int:
    """Correct a reservation by `delta` units (actual - reserved) once the real usage is known.

    A refund never moves `tat` before now: units that already refilled cannot be given back twice.
    """
    limit, burst = effective(params, override_limit)
    if delta >= 0:
        return max(tat, now_us) + increment_us(delta, limit, burst, params.window_us)
    refund = math.floor(float(-delta) * float(params.window_us) / float(limit - burst))
    return max(tat - refund, now_us)


# The operations one batch (one script call) runs in order; limiter_lua.BATCH is their twin.
# Named tuples, not frozen dataclasses: the limiter builds one or more per acquire, and a frozen
# dataclass's __init__ cost several times as much. Ops are told apart by isinstance, never by ==.
class Reserve(NamedTuple):
    """A reservation of `priority`, at most `max_ahead_us` from now (its horizon and deadline).

    Refused for its horizon only (the slot is within `deadline_us`), it takes a ticket: the
    class's queue of refused requests advances by the request's longest increment, and the
    answer is the ticket's slot, so callers refused one after the other (in any process)
    come back one after the other, in that order, instead of all at the same refill. A caller
    that comes back with a ticket and is refused again (higher classes took the room meanwhile)
    takes no new ticket at the back of the queue: its answer is its real slot, ahead of the
    tickets given since.
    """

    priority: str
    max_ahead_us: int
    costs: tuple[int, ...]
    deadline_us: int = 0  # the caller's remaining time; 0 = max_ahead_us
    returning: bool = False  # asked before and was refused for its horizon

    @property
    def critical(self) -> bool:
        return self.priority == CRITICAL


class Lease(NamedTuple):
    """A lease of up to `wanted` admissions of `costs` each (see `lease`); granted only while no
    pause holds and no class holds a ticket ahead of now (contended traffic is reserved)."""

    costs: tuple[int, ...]
    wanted: int


class Confirm(NamedTuple):
    """A caller woke at its slot: is the budget paused? If so its reservation goes back."""

    reserved: tuple[int, ...]  # the tats its reservation left
    costs: tuple[int, ...]


class GiveBack(NamedTuple):
    reserved: tuple[int, ...]
    costs: tuple[int, ...]


class Charge(NamedTuple):
    units: tuple[int, ...]  # per limit (local admissions during an outage)


class Empty(NamedTuple):
    buckets: tuple[bool, ...]  # the limits the upstream reported empty (remaining: 0)


class Pause(NamedTuple):
    """An upstream 429: hold every request until now + pause_us, and every bucket is empty now."""

    pause_us: int


class Override(NamedTuple):
    """Tighter limits learned from the upstream (0 = none for that limit), kept `ttl_us` for the
    whole budget; the batches after this one decide with them."""

    limits: tuple[int, ...]
    ttl_us: int


Op = Reserve | Lease | Confirm | GiveBack | Charge | Empty | Pause | Override

# The classes' ticket queues in the stored state, in this order (limiter_lua's CLASSES).
CLASSES = ("critical", "high", "normal", "low")
TICKETS_KEPT_US = 60_000_000  # the queue is forgotten this long after its last ticket
USED_KEPT_MS = 3_600_000  # the state outlives its last write by at least this (the utilization)


@dataclass(frozen=True)
class Bucket:
    """One limit's stored state."""

    tat: int = 0
    tat_expires_us: int = 0  # from then on the bucket has no state (cold start); 0 = never stored
    used: float = 0.0  # the weighted units admitted (utilization), as of used_at_us
    used_at_us: int = 0
    override: int = 0  # a tighter limit from the upstream (0 = none), until overrides_expire_us


@dataclass(frozen=True)
class State:
    """Everything one budget stores: one Redis string (limiter_lua's load/store, decode_state)."""

    pause_until_us: int = 0
    queue_expires_us: int = 0
    queue: tuple[int, ...] = (0, 0, 0, 0)  # per CLASSES: the slot of its last ticket
    overrides_expire_us: int = 0
    buckets: tuple[tuple[str, Bucket], ...] = ()  # by limit name; the calling agent's limits first


STATE_FORMAT = "s1"


def decode_state(raw: str | bytes | None) -> State | None:
    """The stored string as the script writes it (None: no state, or another format)."""
    if raw is None:
        return None
    f = (raw.decode() if isinstance(raw, bytes) else raw).split()
    if not f or f[0] != STATE_FORMAT:
        return None
    buckets = tuple(
        (f[k], Bucket(int(f[k + 1]), int(f[k + 2]), float(f[k + 3]), int(f[k + 4]), int(f[k + 5])))
        for k in range(8, len(f), 6)
    )
    return State(int(f[1]), int(f[2]), tuple(int(x) for x in f[3:7]), int(f[7]), buckets)


def keep_ms(state: State, now_us: int) -> int:
    """How long the stored string lives: until the last of its parts expires, and at least
    USED_KEPT_MS."""
    ends = [state.pause_until_us, state.queue_expires_us, state.overrides_expire_us]
    ends += [b.tat_expires_us for _, b in state.buckets]
    return max([USED_KEPT_MS] + [math.ceil(float(e - now_us) / 1000.0) for e in ends])


@dataclass(frozen=True)
class OpResult:
    # Reserve: 1 admitted, 0 refused, 2 too large; Lease: 3 granted, 0 none; Confirm: 1 go, 0 paused;
    # else 1
    status: int
    value: int  # Reserve: the slot; Lease: the admissions granted; Confirm: the pause end; else 0
    limiting: int
    tats: tuple[int, ...]  # the buckets after this op


@dataclass(frozen=True)
class BatchResult:
    tats: tuple[int, ...]
    used: tuple[float, ...]
    pause_until_us: int
    results: tuple[OpResult, ...]
    state: State  # what is stored after the batch
    written: bool  # the batch stored a new state (nothing changed: no write)


def run_batch(
    state: State | None,
    now_us: int,
    params: tuple[LimitParams, ...],
    reserve_fraction: float,
    ops: tuple[Op, ...],
    lease_us: int = 0,
) -> BatchResult:
    """One script call: the ops in order on the stored state at one server instant (`lease_us`:
    the life of a lease; 0: none granted)."""
    state = state or State()
    stored = dict(state.buckets)
    base = [stored.get(p.name) for p in params]
    overrides_live = now_us < state.overrides_expire_us
    overrides = [b.override if overrides_live and b is not None else 0 for b in base]
    limits = Limits(params, tuple(o or None for o in overrides), reserve_fraction)
    tats = tuple(
        b.tat if b is not None and now_us < b.tat_expires_us else fresh_tat(limits, i, now_us)
        for i, b in enumerate(base)
    )
    first = tats
    pause_until_us = state.pause_until_us if state.pause_until_us > now_us else 0  # a pause that ended
    live_queue = now_us < state.queue_expires_us
    queue = dict(zip(CLASSES, state.queue if live_queue else (0,) * len(CLASSES), strict=True))
    queue_expires_us, overrides_expire_us = state.queue_expires_us, state.overrides_expire_us
    weighted = [
        0.0 if b is None else decay(b.used, b.used_at_us, now_us, p.window_us)
        for b, p in zip(base, params, strict=True)
    ]
    touched = False  # something besides the tats to store
    results: list[OpResult] = []
    for op in ops:
        status, value, limiting = 1, 0, -1
        if isinstance(op, Reserve):
            v = reserve(tats, now_us, op.costs, limits, op.critical, op.max_ahead_us, pause_until_us)
            status = 2 if v.too_large else int(v.admitted)
            value, limiting, tats = v.slot_us, v.limiting, v.tats
            if status == 0 and not op.returning and op.max_ahead_us < max(op.deadline_us, op.max_ahead_us):
                spacing = max(limits.increment(i, c) for i, c in enumerate(op.costs))
                value = max(v.slot_us, queue[op.priority] + spacing)
                if value - now_us <= op.deadline_us:
                    queue[op.priority] = value
                    queue_expires_us, touched = now_us + TICKETS_KEPT_US, True
            if v.admitted:
                weighted = [w + float(c) for w, c in zip(weighted, op.costs, strict=True)]
                touched = True
        elif isinstance(op, Lease):
            status = 0
            calm = lease_us > 0 and pause_until_us <= now_us and all(q <= now_us for q in queue.values())
            if calm:
                granted, leased = lease(tats, now_us, op.costs, limits, op.wanted, lease_us)
                if granted:
                    status, value, tats, touched = 3, granted, leased, True
                    weighted = [w + float(granted * c) for w, c in zip(weighted, op.costs, strict=True)]
        elif isinstance(op, Confirm):
            if now_us < pause_until_us:
                status, value = 0, pause_until_us
                tats = give_back(tats, op.reserved, op.costs, limits)
        elif isinstance(op, GiveBack):
            tats = give_back(tats, op.reserved, op.costs, limits)
        elif isinstance(op, Charge):
            tats = tuple(
                charge(t, now_us, u, limits, i) if u else t
                for i, (t, u) in enumerate(zip(tats, op.units, strict=True))
            )
            weighted = [w + float(u) for w, u in zip(weighted, op.units, strict=True)]
            touched = True
        elif isinstance(op, Empty):
            tats = tuple(
                empty(t, now_us, limits, i) if e else t
                for i, (t, e) in enumerate(zip(tats, op.buckets, strict=True))
            )
        elif isinstance(op, Override):
            overrides = [v or o for v, o in zip(op.limits, overrides, strict=True)]
            overrides_expire_us, touched = now_us + op.ttl_us, True
        else:
            if now_us + op.pause_us > pause_until_us:
                pause_until_us, touched = now_us + op.pause_us, True
            tats = tuple(empty(t, now_us, limits, i) for i, t in enumerate(tats))
        results.append(OpResult(status, value, limiting, tats))
    changed = tats != first
    if not (changed or touched):
        return BatchResult(tats, tuple(weighted), pause_until_us, tuple(results), state, False)
    buckets: list[tuple[str, Bucket]] = []
    for i, (p, b) in enumerate(zip(params, base, strict=True)):
        tat, expires = (0, 0) if b is None else (b.tat, b.tat_expires_us)
        if changed:
            # kept a window (at least a second) after the bucket is full again: a bucket with no
            # state is a cold start or a budget unused that long
            keep = max(math.ceil(float(tats[i] - now_us + p.window_us) / 1000.0), 1000)
            tat, expires = tats[i], now_us + keep * 1000
        buckets.append((p.name, Bucket(tat, expires, weighted[i], now_us, overrides[i])))
    names = {p.name for p in params}
    for name, b in state.buckets:  # another agent's limits (a configuration being rolled out)
        if name not in names:
            buckets.append((name, b if overrides_live else replace(b, override=0)))
    new = State(
        pause_until_us,
        queue_expires_us,
        tuple(queue[c] for c in CLASSES),
        overrides_expire_us,
        tuple(buckets),
    )
    return BatchResult(tats, tuple(weighted), pause_until_us, tuple(results), new, True)
