"""The bucket math: properties of the pure function, and agreement with the Lua script in Redis."""

from __future__ import annotations

import uuid

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tars_agent import gcra, limiter_lua
from tars_agent.gcra import LimitParams
from tars_agent.limiter import budget_keys, parse_reset, tat_key

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


@settings(max_examples=300, deadline=None)
@given(
    params=limit_params(),
    steps=st.lists(
        st.tuples(st.integers(0, 3_000_000), st.integers(1, 50), PRIORITY), min_size=1, max_size=200
    ),
    reserve=st.floats(0, 0.9),
)
def test_no_closed_window_exceeds_the_limit(
    params: LimitParams, steps: list[tuple[int, int, str]], reserve: float
) -> None:
    now, tats = 1_000_000, (0,)
    admitted: list[tuple[int, int]] = []
    for dt, cost, priority in steps:
        now += dt
        d = gcra.decide(tats, now, (cost,), (params,), (None,), priority, reserve)
        if d.admitted:
            tats = d.tats
            admitted.append((now, cost))
    if admitted:
        assert max_in_closed_window(admitted, params.window_us) <= params.limit


@settings(max_examples=300, deadline=None)
@given(
    params=limit_params(),
    prior=st.lists(st.integers(1, 20), max_size=30),
    cost=st.integers(1, 20),
    priority=PRIORITY,
    reserve=st.floats(0, 0.9),
)
def test_retry_after_is_exact_never_early(
    params: LimitParams, prior: list[int], cost: int, priority: str, reserve: float
) -> None:
    now, tats = 5_000_000, (0,)
    for c in prior:  # fill the bucket at one instant
        d = gcra.decide(tats, now, (c,), (params,), (None,), "critical", reserve)
        tats = d.tats
    d = gcra.decide(tats, now, (cost,), (params,), (None,), priority, reserve)
    if d.admitted or d.too_large:
        return
    wait = d.retry_after_us
    assert wait > 0
    early = gcra.decide(tats, now + wait - 1, (cost,), (params,), (None,), priority, reserve)
    on_time = gcra.decide(tats, now + wait, (cost,), (params,), (None,), priority, reserve)
    assert not early.admitted
    assert on_time.admitted


@settings(max_examples=200, deadline=None)
@given(params=limit_params(), steps=st.lists(st.integers(0, 100_000), min_size=1, max_size=100))
def test_bulk_traffic_leaves_headroom_for_critical(params: LimitParams, steps: list[int]) -> None:
    reserve = 0.5
    now, tats = 1_000_000, (0,)
    for dt in steps:
        now += dt
        d = gcra.decide(tats, now, (1,), (params,), (None,), "low", reserve)
        if d.admitted:
            tats = d.tats
    inc = gcra.increment_us(1, params.limit, params.burst, params.window_us)
    tau_critical = gcra.tolerance_us(params.limit, params.burst, params.window_us, reserve, True)
    tau_bulk = gcra.tolerance_us(params.limit, params.burst, params.window_us, reserve, False, 1)
    critical = gcra.decide(tats, now, (1,), (params,), (None,), "critical", reserve)
    if tau_critical - tau_bulk >= inc:  # the reserve holds at least one request
        assert critical.admitted


def test_pause_denies_every_priority_until_its_end() -> None:
    p = LimitParams("rpm", 10, 60_000_000, 2)
    d = gcra.decide((0,), 1_000, (1,), (p,), (None,), "critical", 0.1, pause_until_us=5_000)
    assert (d.admitted, d.retry_after_us) == (False, 4_000)
    assert gcra.decide((0,), 5_000, (1,), (p,), (None,), "critical", 0.1, pause_until_us=5_000).admitted


def test_request_larger_than_the_bucket_is_reported_not_waited_for() -> None:
    p = LimitParams("tpm", 1000, 60_000_000, 50, "tokens")
    d = gcra.decide((0,), 1, (51,), (p,), (None,), "critical", 0.0)
    assert d.too_large and not d.admitted


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


def test_parse_reset_durations() -> None:
    assert parse_reset("6m0s") == 360.0
    assert parse_reset("1.5s") == 1.5
    assert parse_reset("20ms") == 0.02
    assert parse_reset("1h2m3s") == 3723.0
    assert parse_reset("7") == 7.0
    assert parse_reset("soon") is None
    assert parse_reset("") is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    limits=st.lists(limit_params(max_window_us=20_000), min_size=1, max_size=3),
    ops=st.lists(st.tuples(st.integers(1, 30), PRIORITY, st.integers(-20, 20)), min_size=1, max_size=40),
    reserve=st.floats(0, 0.9),
    override=st.one_of(st.none(), st.integers(2, 6000)),
)
def test_lua_script_agrees_with_pure_function(
    redis_server: RedisServer,
    limits: list[LimitParams],
    ops: list[tuple[int, str, int]],
    reserve: float,
    override: int | None,
) -> None:
    """Run real decisions in Redis (server clock) and replay each with the pure function at the
    server time the script reports: admission, retry-after and new state must match exactly.
    Short windows make real elapsed time exercise the refill paths."""
    limits = [LimitParams(f"l{i}", p.limit, p.window_us, p.burst, "tokens") for i, p in enumerate(limits)]
    client = redis.Redis(port=redis_server.port)
    try:
        budget = f"agree-{uuid.uuid4().hex}"
        pause_key, overrides_key = budget_keys(budget)
        keys = [tat_key(budget, p.name) for p in limits]
        overrides = tuple(override if i == 0 else None for i in range(len(limits)))
        if override is not None:
            client.hset(overrides_key, "l0", override)
        acquire = client.register_script(limiter_lua.ACQUIRE)
        reconcile = client.register_script(limiter_lua.RECONCILE)
        tats = tuple(0 for _ in limits)
        for cost, priority, delta in ops:
            args: list[str | int] = [priority, repr(reserve), len(limits)]
            for p in limits:
                args += [p.name, p.limit, p.window_us, p.burst, cost]
            reply = acquire(keys=[pause_key, overrides_key, *keys], args=args)
            admitted, wait, now, denied_by, too_large = (int(x) for x in reply[:5])
            expected = gcra.decide(
                tats, now, tuple(cost for _ in limits), tuple(limits), overrides, priority, reserve
            )
            assert (bool(admitted), wait, denied_by, bool(too_large)) == (
                expected.admitted,
                expected.retry_after_us,
                expected.denied_by,
                expected.too_large,
            )
            assert tuple(int(x) for x in reply[5:]) == expected.tats
            tats = expected.tats
            if admitted and delta:
                now2, new_tat = (
                    int(x)
                    for x in reconcile(
                        keys=[overrides_key, keys[0]],
                        args=["l0", limits[0].limit, limits[0].window_us, limits[0].burst, delta],
                    )
                )
                assert new_tat == gcra.reconcile(tats[0], now2, delta, limits[0], overrides[0])
                stored = int(client.get(keys[0]) or 0)
                assert stored == (new_tat if new_tat > now2 else 0)
                tats = (stored, *tats[1:])
    finally:
        client.close()
