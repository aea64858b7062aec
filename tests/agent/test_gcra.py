"""The bucket math: properties of the pure reservation model, and agreement with the Lua script in Redis."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tars_agent import gcra, limiter_lua
from tars_agent.gcra import LimitParams
from tars_agent.limiter import _op_args, agents_key, state_key

from .conftest import RedisServer

PRIORITY = st.sampled_from(["critical", "high", "normal", "low"])


@st.composite
def limit_params(draw: st.DrawFn, max_window_us: int = 10_000_000) -> LimitParams:
    limit = draw(st.integers(2, min(5000, max_window_us)))
    burst = draw(st.integers(1, limit - 1))
    window_us = draw(st.integers(limit - burst, max_window_us))
    return LimitParams("l", limit, window_us, burst)


def max_in_closed_window(admissions: list[tuple[int, int]], window_us: int) -> int:
    """Largest total cost admitted in any closed interval [t, t + window]."""
    best, total, lo = 0, 0, 0
    for t, cost in admissions:  # sorted by time
        total += cost
        while admissions[lo][0] < t - window_us:
            total -= admissions[lo][1]
            lo += 1
        best = max(best, total)
    return best


def one(params: LimitParams, reserve: float = 0.0) -> gcra.Limits:
    return gcra.Limits((params,), (None,), reserve)


@settings(max_examples=300, deadline=None)
@given(
    params=limit_params(),
    steps=st.lists(
        st.tuples(st.integers(0, 3_000_000), st.integers(1, 50), PRIORITY, st.integers(0, 20_000_000)),
        min_size=1,
        max_size=200,
    ),
    reserve=st.floats(0, 0.9),
)
def test_no_closed_window_exceeds_the_limit_whatever_the_order_of_slots(
    params: LimitParams, steps: list[tuple[int, int, str, int]], reserve: float
) -> None:
    """Reservations of every class, each allowed its own distance ahead: the slots (when the
    requests start) never put more than the limit in any closed window."""
    limits = one(params, reserve)
    now, tats = 1_000_000, (0,)
    admitted: list[tuple[int, int]] = []
    for dt, cost, priority, ahead in steps:
        now += dt
        v = gcra.reserve(tats, now, (cost,), limits, priority == "critical", ahead)
        if v.admitted:
            assert now <= v.slot_us <= now + ahead
            tats = v.tats
            admitted.append((v.slot_us, cost))
    if admitted:
        assert max_in_closed_window(sorted(admitted), params.window_us) <= params.limit


@settings(max_examples=300, deadline=None)
@given(
    params=limit_params(),
    prior=st.lists(st.integers(1, 20), max_size=30),
    cost=st.integers(1, 20),
    priority=PRIORITY,
)
def test_a_refusal_names_the_exact_slot_and_charges_nothing(
    params: LimitParams, prior: list[int], cost: int, priority: str
) -> None:
    limits = one(params, 0.2)
    now, tats = 5_000_000, (0,)
    for c in prior:
        tats = gcra.reserve(tats, now, (c,), limits, True, 10**12).tats
    v = gcra.reserve(tats, now, (cost,), limits, priority == "critical", 0)
    if v.admitted or v.too_large:
        return
    assert v.tats == tats  # nothing charged
    wait = v.slot_us - now
    early = gcra.reserve(tats, now, (cost,), limits, priority == "critical", wait - 1)
    on_time = gcra.reserve(tats, now, (cost,), limits, priority == "critical", wait)
    assert not early.admitted and on_time.admitted and on_time.slot_us == v.slot_us


@given(params=limit_params(), n=st.integers(2, 40))
def test_reservations_of_one_class_are_first_come_first_served(params: LimitParams, n: int) -> None:
    limits = one(params)
    tats, slots = (0,), []
    for _ in range(n):
        v = gcra.reserve(tats, 1_000_000, (1,), limits, False, 10**12)
        tats = v.tats
        slots.append(v.slot_us)
    assert slots == sorted(slots)


def test_nothing_is_charged_in_any_bucket_when_one_says_no() -> None:
    requests = LimitParams("rpm", 100, 60_000_000, 10)
    tokens = LimitParams("tpm", 1000, 60_000_000, 100, "tokens")
    limits = gcra.Limits((requests, tokens), (None, None), 0.0)
    tats = (0, gcra.reserve((0,), 1, (100,), gcra.Limits((tokens,), (None,), 0.0), True, 0).tats[0])
    v = gcra.reserve(tats, 1, (1, 50), limits, True, 1_000)
    assert not v.admitted and v.tats == tats and v.limiting == 1


# Rows: what a critical request waits once lower classes reserved all they may, 600/min, burst 30.
@pytest.mark.parametrize(("lower", "critical_wait_at_most_s"), [("low", 0.5), ("normal", 1.0), ("high", 2.0)])
def test_a_lower_class_delays_a_higher_one_by_at_most_its_horizon(
    lower: str, critical_wait_at_most_s: float
) -> None:
    limits = one(LimitParams("rpm", 600, 60_000_000, 30), 0.1)
    now, tats = 1_000_000, (0,)
    reserved = 0
    while (v := gcra.reserve(tats, now, (1,), limits, False, gcra.max_ahead_us(lower, 10**9))).admitted:
        tats, reserved = v.tats, reserved + 1
    assert reserved > 27  # the burst and the horizon
    critical = gcra.reserve(tats, now, (1,), limits, True, 10**9)
    assert critical.admitted and (critical.slot_us - now) / 1e6 <= critical_wait_at_most_s
    assert gcra.max_ahead_us("critical", 123) == 123


# Rows: the class order under saturation: a class only gets what the ones above leave.
@pytest.mark.parametrize(
    ("upper", "lower"), [("critical", "high"), ("high", "normal"), ("normal", "low"), ("high", "low")]
)
def test_under_saturation_a_higher_class_keeps_a_lower_one_out(upper: str, lower: str) -> None:
    limits = one(LimitParams("rpm", 600, 60_000_000, 30), 0.1)
    now, tats = 1_000_000, (0,)
    served = {upper: 0, lower: 0}
    for _ in range(200):  # both ask every 10 ms, 2 s in all
        now += 10_000
        for priority in (lower, upper):
            ahead = gcra.max_ahead_us(priority, 30_000_000)
            v = gcra.reserve(tats, now, (1,), limits, priority == "critical", ahead)
            if v.admitted:
                tats, served[priority] = v.tats, served[priority] + 1
    # the lower class only got in while the bucket was still filling
    assert served[upper] > 2 * served[lower]


def test_a_reservation_goes_back_only_while_it_is_the_head() -> None:
    limits = one(LimitParams("rpm", 600, 60_000_000, 30))
    first = gcra.reserve((0,), 1_000_000, (1,), limits, True, 10**9)
    assert (
        gcra.give_back(first.tats, first.tats, (1,), limits) == (0,)
        or gcra.give_back(first.tats, first.tats, (1,), limits)[0] < first.tats[0]
    )
    second = gcra.reserve(first.tats, 1_000_000, (1,), limits, True, 10**9)
    assert gcra.give_back(second.tats, first.tats, (1,), limits) == second.tats  # not the head: kept


def test_a_fresh_bucket_starts_with_half_its_burst() -> None:
    limits = one(LimitParams("rpm", 600, 60_000_000, 30))
    tats, admitted = (gcra.fresh_tat(limits, 0, 1_000_000),), 0
    while (v := gcra.reserve(tats, 1_000_000, (1,), limits, True, 0)).admitted:
        tats, admitted = v.tats, admitted + 1
    assert 14 <= admitted <= 15  # half of 30, less the rounding up of each increment
    tiny = one(LimitParams("rpm", 2, 60_000_000, 1))
    assert gcra.reserve((gcra.fresh_tat(tiny, 0, 5),), 5, (1,), tiny, True, 0).admitted  # at least one


def test_an_empty_bucket_admits_after_one_refill() -> None:
    limits = one(LimitParams("rpm", 600, 60_000_000, 30))
    tats = (gcra.empty(0, 1_000_000, limits, 0),)
    v = gcra.reserve(tats, 1_000_000, (1,), limits, True, 10**9)
    assert v.slot_us - 1_000_000 == limits.increment(0, 1)


def test_utilization_reads_one_when_the_budget_is_saturated() -> None:
    params = LimitParams("rpm", 600, 60_000_000, 30)
    limits = one(params)
    used, at, tats = 0.0, 0, (0,)
    now = 0
    for _ in range(20_000):  # 30 minutes at the sustainable rate
        v = gcra.reserve(tats, now, (1,), limits, True, 10**12)
        used = gcra.decay(used, at, now, params.window_us) + 1.0
        tats, at, now = v.tats, now, v.tats[0] - limits.tolerance(0, True) + limits.increment(0, 1)
    assert 0.97 < gcra.utilization(gcra.decay(used, at, now, params.window_us), limits, 0) < 1.03
    assert (
        gcra.utilization(gcra.decay(used, at, now + 10 * params.window_us, params.window_us), limits, 0)
        < 0.01
    )


def test_request_larger_than_the_bucket_is_reported_not_waited_for() -> None:
    limits = one(LimitParams("tpm", 1000, 60_000_000, 50, "tokens"))
    v = gcra.reserve((0,), 1, (51,), limits, True, 10**9)
    assert v.too_large and not v.admitted


def test_override_tightens_the_limit() -> None:
    p = LimitParams("rpm", 100, 60_000_000, 10)
    assert gcra.effective(p, None) == (100, 10)
    assert gcra.effective(p, 200) == (100, 10)
    assert gcra.effective(p, 50) == (50, 5)


@given(
    tat=st.integers(0, 10**9),
    now=st.integers(0, 10**9),
    delta=st.integers(-5000, 5000),
    params=limit_params(),
)
def test_reconcile_refund_never_goes_before_now(tat: int, now: int, delta: int, params: LimitParams) -> None:
    new_tat = gcra.reconcile(tat, now, delta, params, None)
    assert new_tat >= now
    if delta > 0:
        assert new_tat > max(tat, now)


@st.composite
def batch_ops(draw: st.DrawFn, n: int) -> list[tuple[str, int, int, tuple[int, ...]]]:
    """Abstract ops; reserved tats for confirm/give-back are filled in from earlier reservations."""
    kinds = st.sampled_from(["r", "r", "r", "l", "l", "c", "g", "k", "e", "p", "o"])
    costs = st.tuples(*[st.integers(0, 30) for _ in range(n)])
    return draw(
        st.lists(st.tuples(kinds, st.integers(0, 1), st.integers(0, 40_000), costs), min_size=1, max_size=12)
    )


def assert_reply_is_the_models(
    reply: Sequence[Any], expected: gcra.BatchResult, ops: Sequence[object], n: int
) -> None:
    """The script's reply to a batch, field by field, against the model's run of the same ops."""
    assert tuple(float(x) for x in reply[3 : 3 + n]) == expected.used
    assert tuple(int(x) for x in reply[3 + n : 3 + 2 * n]) == expected.tats
    at = 3 + 2 * n
    for op, result in zip(ops, expected.results, strict=True):
        got = (
            int(reply[at]),
            int(reply[at + 1]),
            int(reply[at + 2]),
            tuple(int(x) for x in reply[at + 3 : at + 3 + n]),
        )
        assert got == (result.status, result.value, result.limiting, result.tats), op
        at += 3 + n


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    limits=st.lists(limit_params(max_window_us=20_000), min_size=1, max_size=3),
    batches=st.lists(batch_ops(3), min_size=1, max_size=6),
    reserve=st.floats(0, 0.9),
    foreign=st.booleans(),
    lease_us=st.sampled_from([0, 100, 2_000]),
)
def test_lua_batch_agrees_with_the_pure_model(
    redis_server: RedisServer,
    limits: list[LimitParams],
    batches: list[list[tuple[str, int, int, tuple[int, ...]]]],
    reserve: float,
    foreign: bool,
    lease_us: int,
) -> None:
    """Run real batches in Redis (server clock) and replay each with gcra.run_batch at the server
    time the script reports: every op's answer and the stored state must match exactly, and the
    state is written only when the model says it changed. Short windows make real elapsed time
    exercise the refill, decay and expiry paths. `foreign`: the first batches come from an agent
    with one limit less (a configuration being rolled out), whose state the others keep."""
    params = tuple(
        LimitParams(f"l{i}", p.limit, p.window_us, p.burst, "tokens") for i, p in enumerate(limits)
    )
    client = redis.Redis(port=redis_server.port)
    try:
        budget = f"agree-{uuid.uuid4().hex}"
        keys = [state_key(budget), agents_key(budget)]
        script = client.register_script(limiter_lua.BATCH)
        state: gcra.State | None = None
        reserved: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        for number, abstract in enumerate(batches):
            calling = params[:-1] if foreign and number < len(batches) // 2 and len(params) > 1 else params
            n = len(calling)
            ops: list[gcra.Op] = []
            for kind, flag, amount, all_costs in abstract:
                costs = all_costs[:n]
                if kind == "r":
                    priority = ["low", "critical"][flag] if amount % 3 else "normal"
                    deadline = amount * (amount % 4)
                    returning = amount % 5 == 1
                    ops.append(
                        gcra.Reserve(priority, amount, tuple(max(c, 1) for c in costs), deadline, returning)
                    )
                elif kind == "l":
                    ops.append(gcra.Lease(costs, amount % 60))
                elif kind in "cg":
                    usable = [(t, c) for t, c in reserved if len(t) == n]
                    if usable:
                        tats, rcosts = usable[amount % len(usable)]
                        ops.append(gcra.Confirm(tats, rcosts) if kind == "c" else gcra.GiveBack(tats, rcosts))
                elif kind == "k":
                    ops.append(gcra.Charge(costs))
                elif kind == "e":
                    ops.append(gcra.Empty(tuple(bool(c % 2) for c in costs)))
                elif kind == "p":
                    ops.append(gcra.Pause(amount))
                else:
                    ops.append(gcra.Override(tuple(c * 200 for c in costs), amount * flag))
            if not ops:
                continue
            args: list[str | int | float] = [repr(reserve), lease_us, n]
            for p in calling:
                args += [p.name, p.limit, p.window_us, p.burst]
            args += ["agent-a", 10_000_000, "1" if number == 0 else "", f"ch-{budget}", len(ops)]
            for op in ops:
                args += _op_args(op, n)
            before = client.get(state_key(budget))
            reply = script(keys=keys, args=args)
            now = int(reply[0])
            expected = gcra.run_batch(state, now, calling, reserve, tuple(ops), lease_us)
            assert int(reply[1]) == expected.pause_until_us
            assert int(reply[2]) == 1  # one agent heard of
            assert_reply_is_the_models(reply, expected, ops, n)
            for op, result in zip(ops, expected.results, strict=True):
                if isinstance(op, gcra.Reserve) and result.status == 1:
                    reserved.append((result.tats, op.costs))
            raw = client.get(state_key(budget))
            if expected.written:
                assert gcra.decode_state(raw) == expected.state
                ttl = client.pttl(state_key(budget))
                assert gcra.keep_ms(expected.state, now) - 1000 < ttl <= gcra.keep_ms(expected.state, now)
            else:
                assert raw == before
            state = expected.state
    finally:
        client.close()


def test_a_bucket_unused_for_its_keep_starts_afresh_and_expired_parts_are_forgotten() -> None:
    """The stored parts expire as the keys of limiter v2 did: a tat a window after the bucket is
    full again (then a cold start), the tickets a minute after the last one, the learned limits
    with their ttl, the pause at its end."""
    p = LimitParams("rpm", 600, 60_000_000, 30)
    now = 1_000_000_000
    first = gcra.run_batch(
        None,
        now,
        (p,),
        0.1,
        (
            gcra.Override((300,), 10_000_000),
            gcra.Reserve("low", 0, (1,), 5_000_000),  # the fresh bucket admits it
            gcra.Pause(2_000_000),
        ),
    )
    assert first.written and first.results[1].status == 1
    bucket = dict(first.state.buckets)["rpm"]
    assert bucket.tat_expires_us == now + math.ceil((bucket.tat - now + p.window_us) / 1000) * 1000
    late = bucket.tat_expires_us
    kept = gcra.run_batch(first.state, late - 1, (p,), 0.1, (gcra.Reserve("critical", 0, (1,)),))
    cold = gcra.run_batch(first.state, late, (p,), 0.1, (gcra.Reserve("critical", 0, (1,)),))
    fresh = gcra.Limits((p,), (None,), 0.1)
    assert cold.results[0].tats[0] > gcra.fresh_tat(fresh, 0, late)  # afresh, at the configured limit
    assert cold.pause_until_us == 0 and kept.pause_until_us == 0
    assert kept.results[0].tats[0] > bucket.tat  # still the stored bucket
    assert dict(cold.state.buckets)["rpm"].override == 0  # the learned limit expired with its ttl


def test_lua_reads_expired_parts_of_the_state_as_the_model_does(redis_server: RedisServer) -> None:
    """A stored state whose pause, tickets, learned limits and one bucket expired before the
    script runs (and a limit of another agent's configuration): the script and the model answer
    and store the same."""
    params = (LimitParams("l0", 600, 60_000_000, 30), LimitParams("l1", 1000, 60_000_000, 100, "tokens"))
    client = redis.Redis(port=redis_server.port)
    try:
        budget = f"expired-{uuid.uuid4().hex}"
        seconds, micros = client.time()
        t = seconds * 1_000_000 + micros
        seed = (
            f"s1 {t - 1} {t - 1} 0 0 {t + 9_000_000} 0 {t - 1} "
            f"l0 {t + 5_000_000} {t - 1} 3.5 {t - 2_000_000} 300 "
            f"l1 {t + 8_000_000} {t + 70_000_000} 12.25 {t - 1_000_000} 0 "
            f"zz {t + 2_000_000} {t + 80_000_000} 1 {t} 7"
        )
        client.set(state_key(budget), seed)
        ops: tuple[gcra.Op, ...] = (
            gcra.Reserve("normal", 0, (1, 40), 30_000_000),
            gcra.Override((200, 0), 5_000_000),
        )
        args: list[str | int | float] = ["0.1", 0, 2]
        for p in params:
            args += [p.name, p.limit, p.window_us, p.burst]
        args += ["", 10_000_000, "", f"ch-{budget}", len(ops)]
        for op in ops:
            args += _op_args(op, 2)
        reply = client.register_script(limiter_lua.BATCH)(
            keys=[state_key(budget), agents_key(budget)], args=args
        )
        now = int(reply[0])
        expected = gcra.run_batch(gcra.decode_state(seed), now, params, 0.1, ops)
        assert int(reply[1]) == expected.pause_until_us == 0
        assert tuple(float(x) for x in reply[3:5]) == expected.used
        assert tuple(int(x) for x in reply[5:7]) == expected.tats
        assert (int(reply[7]), int(reply[8])) == (expected.results[0].status, expected.results[0].value)
        assert gcra.decode_state(client.get(state_key(budget))) == expected.state
        stored = dict(expected.state.buckets)
        assert stored["zz"].override == 0  # the learned limits had expired: not revived by the new one
        assert expected.results[0].status == 0
        assert expected.state.queue[2] == expected.results[0].value  # a new queue, not the old tail
    finally:
        client.close()


def test_a_returning_caller_may_reserve_a_little_beyond_its_horizon_only() -> None:
    assert gcra.max_ahead_us("normal", 10**9, returning=True) == 1_200_000
    assert gcra.max_ahead_us("normal", 10**9) == 1_000_000
    assert gcra.max_ahead_us("low", 300_000, returning=True) == 300_000  # the deadline still bounds it
    assert gcra.max_ahead_us("critical", 123, returning=True) == 123


def test_a_state_of_another_format_is_no_state() -> None:
    assert gcra.decode_state(None) is None
    assert gcra.decode_state(b"s0 1 2") is None


@settings(max_examples=300, deadline=None)
@given(
    params=limit_params(),
    steps=st.lists(
        st.tuples(
            st.integers(0, 3_000_000),
            st.integers(1, 50),
            PRIORITY,
            st.integers(0, 20_000_000),
            st.integers(0, 200),
            st.lists(st.floats(0, 1), max_size=200),
        ),
        min_size=1,
        max_size=120,
    ),
    reserve=st.floats(0, 0.9),
    lease_us=st.integers(0, 3_000_000),
)
def test_leases_spent_anywhere_in_their_life_never_exceed_the_limit(
    params: LimitParams,
    steps: list[tuple[int, int, str, int, int, list[float]]],
    reserve: float,
    lease_us: int,
) -> None:
    """Leases and reservations of every class in any order; a lease's admissions start at any
    instants of its life (some never): no closed window holds more than the limit."""
    limits = one(params, reserve)
    now, tats = 1_000_000, (0,)
    admitted: list[tuple[int, int]] = []
    for dt, cost, priority, ahead, wanted, uses in steps:
        now += dt
        granted, leased = gcra.lease(tats, now, (cost,), limits, wanted, lease_us)
        if granted:
            assert gcra.LEASE_MIN <= granted <= wanted
            tats = leased
            admitted += [(now + round(u * lease_us), cost) for u in uses[:granted]]
            continue
        v = gcra.reserve(tats, now, (cost,), limits, priority == "critical", ahead)
        if v.admitted:
            tats = v.tats
            admitted.append((v.slot_us, cost))
    if admitted:
        assert max_in_closed_window(sorted(admitted), params.window_us) <= params.limit


@settings(max_examples=300, deadline=None)
@given(
    params=limit_params(),
    prior=st.lists(st.tuples(st.integers(1, 20), st.integers(0, 100)), max_size=30),
    cost=st.integers(1, 20),
    priority=PRIORITY,
    reserve=st.floats(0, 0.9),
)
def test_after_any_lease_a_request_of_any_class_is_admitted_at_once(
    params: LimitParams, prior: list[tuple[int, int]], cost: int, priority: str, reserve: float
) -> None:
    """A lease is granted only while it leaves half the usable burst free: a request of any class
    that needs at most that much room is admitted at once after it (no lease delays anyone)."""
    limits = one(params, reserve)
    now, tats = 5_000_000, (0,)
    for c, wanted in prior:
        granted, leased = gcra.lease(tats, now, (c,), limits, wanted, 1_000)
        if granted:
            tats = leased
            if 2 * limits.increment(0, cost) <= limits.tolerance(0, False, cost):
                v = gcra.reserve(tats, now, (cost,), limits, priority == "critical", 0)
                assert v.admitted and v.slot_us == now
        else:
            tats = gcra.reserve(tats, now, (c,), limits, True, 10**12).tats
        now += 1_000


def test_no_lease_while_paused_or_while_a_class_holds_a_ticket() -> None:
    """Contended traffic (tickets ahead) and a paused budget are served by reservations only."""
    params = (LimitParams("rpm", 600_000, 60_000_000, 10_000),)
    now = 10_000_000
    ample = gcra.State(buckets=(("rpm", gcra.Bucket(now - 1, now + 100_000_000)),))  # full
    lease = gcra.Lease((1,), 100)
    assert gcra.run_batch(ample, now, params, 0.1, (lease,), 200_000).results[0].status == 3
    assert gcra.run_batch(ample, now, params, 0.1, (lease,), 0).results[0].status == 0  # leases off
    ticket = gcra.State(0, now + 1_000_000, (0, 0, now + 5, 0), 0, ample.buckets)
    assert gcra.run_batch(ticket, now, params, 0.1, (lease,), 200_000).results[0].status == 0
    paused = gcra.run_batch(ample, now, params, 0.1, (gcra.Pause(1_000), lease), 200_000)
    assert paused.results[1].status == 0
    cold = gcra.run_batch(None, now, params, 0.1, (lease,), 200_000)  # a fresh bucket: half full
    assert cold.results[0].status == 0


@st.composite
def leasable_params(draw: st.DrawFn) -> LimitParams:
    """Limits whose burst lasts long enough for a lease (and some that do not)."""
    limit = draw(st.integers(100, 5000))
    burst = draw(st.integers(limit // 10, limit // 2))
    return LimitParams("l", limit, draw(st.integers(1_000_000, 60_000_000)), burst)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    limits=st.lists(leasable_params(), min_size=1, max_size=3),
    # full (a tat long past) or anywhere near now
    offsets=st.lists(
        st.one_of(st.just(-(10**10)), st.integers(-2_000_000, 2_000_000)), min_size=3, max_size=3
    ),
    ops=st.lists(
        st.tuples(st.sampled_from(["l", "l", "l", "r", "p"]), st.integers(0, 500), PRIORITY),
        min_size=1,
        max_size=8,
    ),
    costs=st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5)),
    ticket=st.sampled_from([False, False, False, True]),
    lease_us=st.sampled_from([1_000, 1_000, 200_000, 0]),
)
def test_lua_leases_agree_with_the_pure_model(
    redis_server: RedisServer,
    limits: list[LimitParams],
    offsets: list[int],
    ops: list[tuple[str, int, str]],
    costs: tuple[int, int, int],
    ticket: bool,
    lease_us: int,
) -> None:
    """Leases on buckets seeded anywhere from full to past their burst (a ticket ahead or not),
    between reservations and pauses: the script and gcra.run_batch answer and store the same."""
    params = tuple(
        LimitParams(f"l{i}", p.limit, p.window_us, p.burst, "tokens") for i, p in enumerate(limits)
    )
    n = len(params)
    client = redis.Redis(port=redis_server.port)
    try:
        budget = f"lease-{uuid.uuid4().hex}"
        seconds, micros = client.time()
        t = seconds * 1_000_000 + micros
        queue = f"{t + 60_000_000} 0 {t + 3_000_000} 0 0" if ticket else "0 0 0 0 0"
        buckets = " ".join(
            f"{p.name} {max(t + offset, 0)} {t + 100_000_000} 0 {t} 0"
            for p, offset in zip(params, offsets, strict=False)
        )
        seed = f"s1 0 {queue} 0 {buckets}"
        client.set(state_key(budget), seed)
        batch: list[gcra.Op] = []
        for kind, amount, priority in ops:
            if kind == "l":
                batch.append(gcra.Lease(costs[:n], gcra.LEASE_MIN + amount))
            elif kind == "r":
                batch.append(gcra.Reserve(priority, amount * 1_000, tuple(max(c, 1) for c in costs[:n])))
            else:
                batch.append(gcra.Pause(amount))
        args: list[str | int | float] = ["0.1", lease_us, n]
        for p in params:
            args += [p.name, p.limit, p.window_us, p.burst]
        args += ["", 10_000_000, "", f"ch-{budget}", len(batch)]
        for op in batch:
            args += _op_args(op, n)
        reply = client.register_script(limiter_lua.BATCH)(
            keys=[state_key(budget), agents_key(budget)], args=args
        )
        now = int(reply[0])
        expected = gcra.run_batch(gcra.decode_state(seed), now, params, 0.1, tuple(batch), lease_us)
        assert_reply_is_the_models(reply, expected, batch, n)
        raw = client.get(state_key(budget))
        if expected.written:
            assert gcra.decode_state(raw) == expected.state
    finally:
        client.close()


def test_a_lease_spent_at_the_end_of_its_life_leaves_no_window_over_the_limit() -> None:
    """The worst case a lease's life makes: granted on a full bucket, every admission spent at its
    last instant, then a saturating demand for a whole window from that instant. Each bucket
    advances from the end of the lease's life, so the window still holds the limit, no more."""
    params = LimitParams("rpm", 600, 60_000_000, 300)
    limits = one(params)
    grant, life = 1_000_000_000, 2_000_000
    granted, tats = gcra.lease((grant - 10**9,), grant, (1,), limits, 100, life)
    assert granted == 100
    admitted = [(grant + life, 1)] * granted
    now = grant + life
    while now <= grant + life + params.window_us:
        while (v := gcra.reserve(tats, now, (1,), limits, True, 0)).admitted:
            tats = v.tats
            admitted.append((v.slot_us, 1))
        now += 10_000
    assert max_in_closed_window(sorted(admitted), params.window_us) == params.limit
