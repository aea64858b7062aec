"""__main__ as a leader that loses its Lease: the pool loops and kopf stop before the lease runs out."""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from fake_lease_api import FakeLeaseAPI, Fault

from tars_operator import __main__ as entry
from tars_operator import handlers, settings
from tars_operator.leader import LeaderElector

LEASE, RENEW_DEADLINE, RETRY = 2.0, 1.4, 0.2
pytestmark = pytest.mark.timeout(60)


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server}}],
                "users": [{"name": "fake", "user": {"token": "t"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                "current-context": "fake",
            }
        )
    )
    return path


async def test_a_leader_that_loses_its_lease_stops_its_pools_and_kopf_and_exits_non_zero_in_time(
    api: FakeLeaseAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = kubeconfig(tmp_path / "kubeconfig", api.host)
    # run() sets these for the process; the test puts them back.
    monkeypatch.setenv("KUBECONFIG", str(config))
    monkeypatch.setattr(handlers, "SETTINGS", handlers.SETTINGS)
    monkeypatch.setattr(handlers, "FENCE", handlers.FENCE)
    fast = functools.partial(
        LeaderElector, lease_duration=LEASE, renew_deadline=RENEW_DEADLINE, retry_period=RETRY
    )
    monkeypatch.setattr(entry, "LeaderElector", fast)
    stopped: dict[str, float] = {}
    pool_running = asyncio.Event()

    async def pool_loop() -> None:
        pool_running.set()
        try:
            await asyncio.Event().wait()
        finally:
            stopped["pool loop"] = time.monotonic()

    async def operator(stop_flag: asyncio.Future[None], **_: Any) -> None:
        # kopf as far as this test goes: a pool's loop starts, and it runs until told to stop.
        task = asyncio.create_task(pool_loop())
        handlers._RUNNERS[("ns", "pool")] = handlers.PoolRunner(uid="u", body={}, task=task)
        await stop_flag
        stopped["kopf"] = time.monotonic()

    monkeypatch.setattr(kopf, "operator", operator)
    opts = settings.OperatorSettings(kubeconfig=str(config), lease_namespace="ns", identity="a")
    running = asyncio.create_task(entry.run(opts))
    await asyncio.wait_for(pool_running.wait(), 5)
    assert handlers.FENCE.holds(), "the leader's pool loops run under its fence"
    api.fault = Fault.HANG
    code = await asyncio.wait_for(running, 2 * LEASE)

    assert code == 1
    lease_runs_out = max(w.at for w in api.audit if w.holder == "a") + LEASE
    for what, at in stopped.items():
        assert at < lease_runs_out, f"{what} stopped {at - lease_runs_out:.2f}s after others could lead"
    assert set(stopped) == {"pool loop", "kopf"}
    assert not handlers.FENCE.holds()
    assert not handlers._RUNNERS
