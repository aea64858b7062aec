"""kopf registrations: an index of agent pods and one reconcile loop per AgentPool.

As kopf's docs recommend for this shape: the pods are only indexed (small
records, no handlers on them, so kopf never writes onto agent pods); each pool
gets a loop that wakes every second to refresh its agents' busy state (and the
queue depth, from Redis where it can), reconciles at once when the pool or its
pods or busy agents change or the queue crosses its threshold, and in any case
every `scaling.interval`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import gc
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tars_contract import contract
from tars_operator import builders, models, observability
from tars_operator.controller import AgentPod, PoolController, agent_state_source, index_entry
from tars_operator.events import COMPONENT, EventRecorder, ObjectRef
from tars_operator.kubeclient import KubeApi, kube_login
from tars_operator.leader import Fence
from tars_operator.policy import rotation
from tars_operator.pool_keys import forget_pool_keys
from tars_operator.security import AccessConfig, PoolAccess
from tars_operator.settings import OperatorSettings
from tars_operator.sources import AgentClient, AgentStateReader, PrometheusReader
from tars_operator.supervision import Backoff, supervise

log = logging.getLogger("tars_operator")
POLL_SECONDS = 1.0
REDIS_TIMEOUT_S = 5.0
# Reading the agents' state is on every pool's 1 s loop: a slow Redis must not hold it long
# (the loop then asks the agents over HTTP).
AGENT_STATE_TIMEOUT_S = 1.0

# Set by main() before kopf starts.
SETTINGS = OperatorSettings()
# (namespace, pool) -> Event: a pod of that pool changed, reconcile now.
_WAKE: dict[tuple[str, str], asyncio.Event] = {}


def _wake(key: tuple[str, str]) -> asyncio.Event:
    return _WAKE.setdefault(key, asyncio.Event())


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # The same credentials as the operator's own calls (kubeclient.kube_login): --kubeconfig
    # (main() has pointed $KUBECONFIG at it), else the service account, never a guess.
    if SETTINGS.kubeconfig:
        return kopf.login_with_kubeconfig(**kwargs)
    return kopf.login_with_service_account(**kwargs)


# Pods listed at most this many at a time when kopf (re)lists them: a list of 2,000 agent pods
# decoded at once held ~75 MB of the operator's RSS (tracemalloc, bench/README.md operator_scale).
POD_LIST_CHUNK = 250
# kopf's worker for an object keeps that object's last event (the whole pod) until it has had no
# new one for this long (kopf's default: 5 s). When 2,000 pods are created, ~1,900 such workers
# were alive at once (gc.get_objects at 100 pools x 20 agents).
WORKER_IDLE_S = 0.5


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = COMPONENT  # kopf's own Events (handler failures)
    settings.posting.reporting_instance = SETTINGS.identity
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.chunk_size = POD_LIST_CHUNK
    settings.queueing.idle_timeout = WORKER_IDLE_S
    # The index's label filter is kopf's, on our side: without a selector the API server sends
    # every pod of the cluster (and each change to one), agents or not, for kopf to drop.
    settings.watching.label_selectors["pods"] = contract.POOL_LABEL


# Allocations from this size up get pages of their own (mmap), returned to the system when freed:
# glibc's default threshold, pinned (mallopt) so glibc does not raise it (see configure_memory).
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def configure_memory() -> None:
    """After startup: what is imported and set up by now lives as long as the process, so it is
    frozen out of every collection (gc.freeze): at 100 pools full collections came every ~8 s
    and took 300-420 ms with the event loop stopped.

    And glibc keeps allocations of MMAP_THRESHOLD and more out of its heap. By default it raises
    that threshold to the size of each such block freed (up to 32 MB), so blocks of 256 KiB to
    2 MB (a TLS connection's read buffer, a list of 250 pods) came from the heap, and what they
    freed stayed with the process: at 100 pools x 20 agents, once the pods had started, 38 of the
    heap's 58 MB were free (mallinfo2) and malloc_trim gave 32 MB of the 148 MB RSS back
    (bench/README.md operator_scale)."""
    gc.freeze()
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc's (and musl's, a no-op)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    configure_kopf(settings)
    memo.api = KubeApi(kube_login(SETTINGS.kubeconfig))
    memo.prometheus = PrometheusReader(SETTINGS.prometheus_url)
    memo.agents = AgentClient()
    memo.access = AccessConfig.from_settings(SETTINGS)
    memo.events = EventRecorder(memo.api, SETTINGS.identity)
    # The default Redis, only to remove deleted pools' keys (no connection until one is deleted).
    memo.redis = aioredis.from_url(
        SETTINGS.redis_url, password=SETTINGS.redis_password, socket_timeout=REDIS_TIMEOUT_S
    )
    memo.agent_states = (
        AgentStateReader(
            aioredis.from_url(
                SETTINGS.redis_url,
                password=SETTINGS.redis_password,
                socket_timeout=AGENT_STATE_TIMEOUT_S,
                socket_connect_timeout=AGENT_STATE_TIMEOUT_S,
            )
        )
        if SETTINGS.agent_state == "redis"
        else None
    )
    configure_memory()


@kopf.index("pods", labels={contract.POOL_LABEL: kopf.PRESENT})
# async: kopf runs sync handlers in threads, and an asyncio.Event must be set in its loop.
async def agent_pods(
    body: kopf.Body, namespace: str | None, labels: Mapping[str, str], **_: Any
) -> dict[Any, AgentPod]:
    key = (namespace or "", labels[contract.POOL_LABEL])
    _wake(key).set()
    return {key: index_entry(body)}


@dataclass
class PoolRunner:
    """One pool's reconcile loop and the newest copy of its object."""

    uid: str
    body: dict[str, Any]
    task: asyncio.Task[None] | None = None


# (namespace, pool) -> its runner. Each pool runs as our own task rather than a kopf
# daemon: kopf puts a finalizer on every object with a daemon, so a pool could not be
# deleted while the operator is down; our pods go with their pool through owner references.
_RUNNERS: dict[tuple[str, str], PoolRunner] = {}


# kopf's handler protocols do not declare index kwargs such as `agent_pods`.
@kopf.on.event(models.GROUP, models.VERSION, models.PLURAL)  # type: ignore[arg-type]
async def pool_event(
    event: kopf.RawEvent,
    body: kopf.Body,
    name: str,
    namespace: str | None,
    uid: str,
    memo: kopf.Memo,
    agent_pods: kopf.Index[tuple[str, str], AgentPod],
    **_: Any,
) -> None:
    key = (namespace or "", name)
    runner = _RUNNERS.get(key)
    gone = event["type"] == "DELETED" or body.metadata.get("deletionTimestamp")
    if runner is not None and (gone or runner.uid != uid):
        if runner.task is not None:
            runner.task.cancel()
        del _RUNNERS[key]
        runner = None
    if gone:
        _WAKE.pop(key, None)
        observability.forget_pool(*key)
        if event["type"] == "DELETED" and not (body.get("spec") or {}).get("redis"):
            await _forget_redis_keys(memo.redis, *key)
        return
    if runner is None:
        runner = PoolRunner(uid=uid, body=dict(body))
        runner.task = asyncio.create_task(_run_pool(runner, key, memo, agent_pods), name=f"pool {key}")
        _RUNNERS[key] = runner
        _wake(key).set()
    elif asks_for_a_cycle(runner.body, body):
        _wake(key).set()
    runner.body = dict(body)


def asks_for_a_cycle(previous: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether a pool's new copy should start a cycle now: its spec (generation), labels or
    annotations changed. Not its status: the loop's own status writes come back as events, and
    waking on them ran one more cycle per write (the next due cycle reads the new copy anyway)."""
    before, after = previous.get("metadata") or {}, current.get("metadata") or {}
    return any(before.get(k) != after.get(k) for k in ("generation", "labels", "annotations"))


def first_cycle_phase(uid: str, interval: float) -> float:
    """How far into its interval a pool's first cycle counts as begun, fixed by its UID in
    [0, interval). After an operator start every pool's first cycle comes at once; counted from
    there, their due cycles (and so their Prometheus reads: 400 queries at once at 100 pools)
    would fall on the same second ever after."""
    return rotation.jitter(uid, dt.timedelta(seconds=interval)).total_seconds()


async def _forget_redis_keys(redis: aioredis.Redis, namespace: str, name: str) -> None:
    """A deleted pool's keys in the default Redis; a failure is logged (the pool is gone: no
    object to post an Event to) and its keys then expire by their TTLs, but for waiting tasks."""
    if not FENCE.holds():
        return
    try:
        removed = await forget_pool_keys(redis, namespace, name)
    except (RedisError, OSError) as exc:
        log.warning("pool %s/%s deleted: removing its Redis keys failed: %s", namespace, name, exc)
        return
    log.info("pool %s/%s deleted: removed its %d Redis keys", namespace, name, removed)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await stop_pools()  # first: the loops use the clients closed below
    await memo.agents.close()
    await memo.prometheus.close()
    await memo.redis.aclose()
    if memo.agent_states is not None:
        await memo.agent_states.close()
    await memo.api.close()


async def _run_pool(
    runner: PoolRunner,
    key: tuple[str, str],
    memo: kopf.Memo,
    agent_pods: kopf.Index[tuple[str, str], AgentPod],
) -> None:
    namespace, name = key

    ref = ObjectRef(f"{models.GROUP}/{models.VERSION}", models.KIND, namespace, name, runner.uid)

    async def emit(kind: str, reason: str, message: str) -> None:
        await memo.events.record(ref, kind, reason, message)

    pool_ref = builders.PoolRef(name, namespace, runner.uid)
    access = PoolAccess(pool_ref, memo.access, memo.api)
    controller = PoolController(
        name=name,
        namespace=namespace,
        uid=runner.uid,
        kube=memo.api,
        prometheus=memo.prometheus,
        agents=memo.agents.for_pool(memo.access.token(pool_ref)),
        defaults=builders.OperatorDefaults(
            redis_url=SETTINGS.redis_url, redis_password=SETTINGS.redis_password is not None
        ),
        emit=emit,
        fence=FENCE,  # read now: __main__ set the elector's before kopf started
    )
    wake = _wake(key)
    controller.metrics_arrived = wake.set
    loop = asyncio.get_running_loop()
    last_cycle = float("-inf")

    async def step() -> None:
        nonlocal last_cycle
        body = runner.body
        parsed, _problems = controller.checked(body)
        interval = parsed.scaling.interval.delta.total_seconds() if parsed else 10.0
        controller.agent_states = agent_state_source(parsed, memo.agent_states)
        woken = wake.is_set()
        wake.clear()
        due = loop.time() - last_cycle >= interval
        if (woken or due) and FENCE.holds():
            # Before the cycle: the pods it creates read their token (and Redis password) from
            # the pool's Secret (a new pool's first step is woken). Before the observation too,
            # so these writes (every refresh_seconds) do not age what the cycle decides on.
            for error in await access.ensure(parsed):
                log.warning("pool %s/%s: %s", namespace, name, error)
                await controller.event("Warning", "AccessFailed", error)
        observed_at = time.monotonic()
        pods, by_name, depth = await controller.observe(list(agent_pods.get(key, [])), parsed)
        if controller.busy_changed(pods) or woken or due or controller.queue_crossed(parsed, depth):
            first = last_cycle == float("-inf")
            last_cycle = loop.time() - (first_cycle_phase(runner.uid, interval) if first else 0.0)
            await controller.cycle(body, pods, by_name, observed_at, depth)
        # asyncio.timeout, not wait_for: no task per pool and second for the wait.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(POLL_SECONDS):
                await wake.wait()

    async def on_crash(exc: Exception, delay: float) -> None:
        log.error("pool %s/%s: the loop crashed; restarting in %.0fs", namespace, name, delay, exc_info=exc)
        observability.LOOP_CRASHES.labels(namespace=namespace, pool=name).inc()
        message = f"{type(exc).__name__}: {exc}; restarting in {delay:.0f}s"
        await controller.event("Warning", "ReconcileCrashed", message)

    try:
        await supervise(step, on_crash, Backoff())
    finally:
        controller.stop()


# The leader's fence, which PoolController asks before each write; __main__ sets the elector's.
# Unlimited when this replica is the only writer (--no-leader-election, tests).
FENCE = Fence.unlimited()


async def stop_pools() -> None:
    """Cancel every pool's loop and wait until they have ended.

    Cancelled again until then: redis-py writes through asyncio.wait_for, which on Python 3.11
    drops a cancel that meets the write's end (CPython gh-86296); that cycle returns normally
    and the loop goes on to the next."""
    tasks = [r.task for r in _RUNNERS.values() if r.task is not None]
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.1)
    await asyncio.gather(*tasks, return_exceptions=True)
    _RUNNERS.clear()
