"""Leader election against a fake Lease API that restarts, hangs, fails, drops
connections and sees holders whose clocks are off: never two acting leaders.

A replica here runs its election as __main__ does: it acts (runs kopf and the
pool loops) from the moment acquire() ends, however it ends, until hold() ends;
then, as the Deployment restarts the process, it campaigns again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from e2e.harness import async_eventually
from fake_lease_api import FakeLeaseAPI, Fault
from prometheus_client import REGISTRY

from tars_contract import metric_names
from tars_operator.kubeclient import KubeApi
from tars_operator.leader import LeaderElector

NAMESPACE, NAME = "tars-system", "tars-operator"
pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class Timing:
    lease: float
    renew_deadline: float
    retry: float


SHORT = Timing(lease=2, renew_deadline=1.2, retry=0.2)
SKEWS = [dt.timedelta(minutes=10), dt.timedelta(minutes=-10)]


@pytest.fixture
async def clients(api: FakeLeaseAPI) -> AsyncIterator[list[KubeApi]]:
    """One ApiClient (one connection pool) per replica, as in separate processes."""
    made: list[KubeApi] = []
    yield made
    for c in made:
        await c.close()


@pytest.fixture
async def tasks(clients: list[KubeApi]) -> AsyncIterator[list[asyncio.Task[None]]]:
    """The test's electors, ended before their clients close."""
    started: list[asyncio.Task[None]] = []
    yield started
    for task in started:
        task.cancel()
    await asyncio.gather(*started, return_exceptions=True)


def elector(api: FakeLeaseAPI, clients: list[KubeApi], identity: str, t: Timing) -> LeaderElector:
    api_client = api.api_client(identity)
    clients.append(api_client)
    return LeaderElector(
        api_client,
        NAMESPACE,
        NAME,
        identity,
        lease_duration=t.lease,
        renew_deadline=t.renew_deadline,
        retry_period=t.retry,
    )


@dataclass
class Replica:
    elector: LeaderElector
    # (acting from, acting until) per term, on this process's monotonic clock.
    terms: list[tuple[float, float]] = field(default_factory=list)
    acting_since: float | None = None

    async def campaign(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # __main__ goes on to act however acquire() ends
                await self.elector.acquire()
            self.acting_since = time.monotonic()
            with contextlib.suppress(Exception):
                await self.elector.hold()
            self.terms.append((self.acting_since, time.monotonic()))
            self.acting_since = None
            assert self.elector.fence.remaining() <= 0, "hold() ended with the fence still holding"

    def all_terms(self) -> list[tuple[float, float]]:
        if self.acting_since is None:
            return list(self.terms)
        return [*self.terms, (self.acting_since, time.monotonic())]


async def lead(e: LeaderElector, tasks: list[asyncio.Task[None]]) -> asyncio.Task[None]:
    await asyncio.wait_for(e.acquire(), 5)
    holding = asyncio.create_task(e.hold())
    tasks.append(holding)
    return holding


async def hold(api: FakeLeaseAPI, fault: Fault, calls: int) -> None:
    """Keep the API server failing with `fault` until `calls` more requests met it."""
    api.fault, target = fault, api.met[fault.value] + calls
    await async_eventually(lambda: api.met[fault.value] >= target, 1.0, f"{calls} calls to meet {fault}")
    api.fault = Fault.NONE


async def renewal(api: FakeLeaseAPI, timeout_s: float = 2.0) -> None:
    """Until the API server accepts one more write (the holder's next renewal)."""
    await asyncio.wait_for(api.until_written(len(api.audit) + 1), timeout_s)


def last_write_by(api: FakeLeaseAPI, holder: str) -> float:
    return max(w.at for w in api.audit if w.holder == holder)


async def test_api_server_faults_during_acquire_do_not_make_a_standby_leader(
    api: FakeLeaseAPI, clients: list[KubeApi], tasks: list[asyncio.Task[None]]
) -> None:
    timing = Timing(lease=3, renew_deadline=2, retry=0.25)
    leader = elector(api, clients, "a", timing)
    holding = await lead(leader, tasks)
    acquiring = asyncio.create_task(elector(api, clients, "b", timing).acquire())
    tasks.append(acquiring)
    # Each fault lasts until both replicas met it, and less than the renew deadline, so the leader
    # rides them all out.
    for fault in (Fault.DROP, Fault.ERROR, None):
        if fault is None:  # an API server restart: connections refused, then reset
            await api.stop()
            await async_eventually(
                lambda: leader.fence.remaining() < timing.renew_deadline - 2 * timing.retry,
                timing.renew_deadline,
                "the leader to miss two renewals while the API server is down",
            )
            await api.start()
        else:
            await hold(api, fault, calls=3)
        await renewal(api)  # the leader renews between faults
        if acquiring.done():
            pytest.fail(f"the standby's acquire() ended ({acquiring!r}) while the leader lives: it would act")
    assert not holding.done(), "the leader stepped down although every fault was shorter than its deadline"
    assert api.holder(NAMESPACE, NAME) == "a"


async def test_a_hung_call_during_acquire_times_out_and_is_retried(
    api: FakeLeaseAPI, clients: list[KubeApi]
) -> None:
    candidate = elector(api, clients, "a", SHORT)
    api.fault = Fault.HANG
    acquiring = asyncio.create_task(candidate.acquire())
    await async_eventually(lambda: api.met[Fault.HANG.value], 2, "its first call to hang")
    api.fault = Fault.NONE
    try:
        await asyncio.wait_for(asyncio.shield(acquiring), 4 * SHORT.retry)
    except TimeoutError:
        acquiring.cancel()
        pytest.fail("acquire() still waits on a call the API server never answers")


async def test_a_hung_renewal_makes_the_leader_step_down_within_the_lease(
    api: FakeLeaseAPI, clients: list[KubeApi], tasks: list[asyncio.Task[None]]
) -> None:
    leader = elector(api, clients, "a", SHORT)
    holding = await lead(leader, tasks)
    assert leader.fence.holds() and sample(metric_names.OPERATOR_LEADER) == 1
    await renewal(api)
    api.fault = Fault.HANG
    try:
        await asyncio.wait_for(asyncio.shield(holding), 2 * SHORT.lease)
    except TimeoutError:
        pytest.fail(f"the leader still acts {2 * SHORT.lease}s into a hung renewal")
    stepped_down = time.monotonic()
    since_renewed = stepped_down - last_write_by(api, "a")
    assert since_renewed < SHORT.lease, f"stepped down {since_renewed:.2f}s after its last renewal"
    fenced = sample(metric_names.OPERATOR_LEADER_FENCED_WRITES_TOTAL)
    assert not leader.fence.holds(), "the fence still holds after the step-down"
    assert sample(metric_names.OPERATOR_LEADER_FENCED_WRITES_TOTAL) == fenced + 1, "a fenced write is counted"
    assert sample(metric_names.OPERATOR_LEADER) == 0


async def test_a_leader_that_sees_another_holder_steps_down_at_once(
    api: FakeLeaseAPI, clients: list[KubeApi], tasks: list[asyncio.Task[None]]
) -> None:
    leader = elector(api, clients, "a", SHORT)
    holding = await lead(leader, tasks)
    api.overwrite(NAMESPACE, NAME, "b")
    taken = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.shield(holding), SHORT.renew_deadline)
    except TimeoutError:
        pytest.fail("the leader still acts after the Lease named another holder")
    assert time.monotonic() - taken < 3 * SHORT.retry, "it waited for its deadline instead of stepping down"
    assert leader.fence.remaining() <= 0


@pytest.mark.parametrize("skew", SKEWS, ids=["ahead", "behind"])
async def test_a_live_leader_keeps_its_lease_whatever_its_clock_says(
    api: FakeLeaseAPI, clients: list[KubeApi], tasks: list[asyncio.Task[None]], skew: dt.timedelta
) -> None:
    api.skew["a"] = skew
    holding = await lead(elector(api, clients, "a", SHORT), tasks)
    acquiring = asyncio.create_task(elector(api, clients, "b", SHORT).acquire())
    tasks.append(acquiring)
    # Long enough for a standby that read the skewed renewTime as expired: the leader's renewals
    # span more than a lease duration while the standby watches.
    first = len(api.audit)
    await async_eventually(
        lambda: api.audit[-1].at - api.audit[first - 1].at > SHORT.lease + SHORT.retry or acquiring.done(),
        3 * SHORT.lease,
        "the leader to renew over a whole lease duration",
    )
    done = {t for t in (acquiring, holding) if t.done()}
    assert acquiring not in done, f"a standby took the lease of a live leader whose clock is {skew} off"
    assert holding not in done, "the live leader lost its lease"


@pytest.mark.parametrize("skew", SKEWS, ids=["ahead", "behind"])
async def test_a_dead_leaders_lease_is_taken_after_one_lease_duration_whatever_its_clock_says(
    api: FakeLeaseAPI, clients: list[KubeApi], skew: dt.timedelta
) -> None:
    api.skew["a"] = skew
    await asyncio.wait_for(elector(api, clients, "a", SHORT).acquire(), 5)  # and then it dies
    died = last_write_by(api, "a")
    try:
        await asyncio.wait_for(elector(api, clients, "b", SHORT).acquire(), 2 * SHORT.lease)
    except TimeoutError:
        pytest.fail(f"the lease of a dead leader whose clock is {skew} off was not taken over")
    took_over = last_write_by(api, "b") - died
    assert SHORT.lease <= took_over < SHORT.lease + 1, f"taken over {took_over:.2f}s after the last renewal"


async def test_two_replicas_under_a_flapping_api_server_never_both_act(
    api: FakeLeaseAPI, clients: list[KubeApi], tasks: list[asyncio.Task[None]]
) -> None:
    replicas = {name: Replica(elector(api, clients, name, SHORT)) for name in ("a", "b")}
    campaigns = [asyncio.create_task(r.campaign()) for r in replicas.values()]
    tasks.extend(campaigns)

    def acting() -> list[str]:
        return [name for name, r in replicas.items() if r.acting_since is not None]

    async def until_acting(what: str) -> str:
        (leader,) = await async_eventually(acting, 3 * SHORT.lease, what)
        return str(leader)

    async def until_nobody_acts(what: str) -> None:
        await async_eventually(lambda: not acting(), 2 * SHORT.lease, what)

    # Each fault is held until it had its effect (never for a fixed time): outages longer than
    # the renew deadline that end a term, quick flaps the leader rides out, and recoveries.
    leader = await until_acting("a first leader")
    api.partitioned = {leader}  # the leader's calls hang; the standby's work
    standby = [name for name in replicas if name != leader]
    await async_eventually(lambda: acting() == standby, 3 * SHORT.lease, "the standby to take over")
    api.partitioned = set()
    await renewal(api)
    api.fault = Fault.HANG
    await until_nobody_acts("the leader to step down while every call hangs")
    api.fault = Fault.NONE
    await until_acting("a leader after the hang")
    for _ in range(4):
        await hold(api, Fault.DROP, calls=2)
        await renewal(api)
    await api.stop()  # a restart
    await until_nobody_acts("the leader to step down while the API server is down")
    await api.start()
    await until_acting("a leader after the restart")
    api.fault = Fault.ERROR
    await until_nobody_acts("the leader to step down while every call fails")
    api.fault = Fault.NONE
    await until_acting("a leader after the errors")
    api.fault = Fault.NONE
    terms = {name: r.all_terms() for name, r in replicas.items()}
    for campaign in campaigns:
        assert not campaign.done(), campaign
    for start, end in terms["a"]:
        for other_start, other_end in terms["b"]:
            assert end < other_start or other_end < start, (
                f"a acted {start:.2f}..{end:.2f} while b acted {other_start:.2f}..{other_end:.2f}"
            )
    for write in api.audit:
        for name, replica_terms in terms.items():
            if name != write.holder:
                assert not any(start <= write.at <= end for start, end in replica_terms), (
                    f"the API server accepted {write.holder}'s write at {write.at:.2f} while {name} acted"
                )
    assert sum(len(t) for t in terms.values()) >= 3, f"too few handovers to prove anything: {terms}"


def sample(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    assert value is not None, f"the operator exports no {name}"
    return value
