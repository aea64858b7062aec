"""`tars-operator` / `python -m tars_operator`: run the AgentPool operator.

Becomes leader first (unless --no-leader-election), then runs kopf with the
handlers in handlers.py, serves its Prometheus metrics on --metrics-port and
kopf's liveness probe on --health-port (/healthz). When it loses leadership
(leader.py: its fence lapsed) it cancels the pool loops, stops kopf and exits
non-zero, so its Deployment restarts it as a candidate."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import kopf
from prometheus_client import start_http_server

from tars_operator import handlers, settings
from tars_operator.kubeclient import KubeApi, kube_login
from tars_operator.leader import LeaderElector

log = logging.getLogger("tars_operator")


async def run(opts: settings.OperatorSettings) -> int:
    handlers.SETTINGS = opts
    if opts.kubeconfig:
        # kopf logs in by itself, from $KUBECONFIG (or in-cluster): point it at the same file.
        os.environ["KUBECONFIG"] = opts.kubeconfig
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    elector: LeaderElector | None = None
    api: KubeApi | None = None
    if opts.leader_election:
        api = KubeApi(kube_login(opts.kubeconfig))
        elector = LeaderElector(api, opts.lease_namespace, opts.lease_name, opts.identity)
        handlers.FENCE = elector.fence
        acquiring = asyncio.create_task(elector.acquire())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not acquiring.done():
            acquiring.cancel()
            await api.close()
            return 0
        acquiring.result()  # acquire() returns only as leader; anything else is a bug, not leadership

    operator_stop: asyncio.Future[None] = loop.create_future()
    operator = asyncio.create_task(
        kopf.operator(
            # Our Lease election decides who runs; kopf's peering would freeze equal replicas.
            standalone=True,
            clusterwide=not opts.namespaces,
            namespaces=list(opts.namespaces),
            liveness_endpoint=f"http://0.0.0.0:{opts.health_port}/healthz",
            stop_flag=operator_stop,
        )
    )
    waiters = {operator, asyncio.create_task(stop.wait())}
    holding = asyncio.create_task(elector.hold()) if elector else None
    if holding:
        waiters.add(holding)
    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    lost = holding is not None and holding in done
    if not operator_stop.done():
        operator_stop.set_result(None)
    # A replica that lost the lease must be gone before any other can take it: its fence
    # lapsed leaseDuration - renewDeadline before that, and it takes half of that to stop.
    shutdown_within = (elector.lease_duration - elector.renew_deadline) / 2 if elector and lost else None
    try:
        async with asyncio.timeout(shutdown_within):
            if lost:
                # The fence already refuses their writes; this stops them trying, first.
                await handlers.stop_pools()
            await operator
    except (asyncio.CancelledError, TimeoutError):
        operator.cancel()
    if holding and not holding.done():
        holding.cancel()
    if elector and not lost:
        await elector.release()
    if api:
        await api.close()
    if lost:
        log.error("leadership lost: exiting so that a fresh candidate takes over")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    opts = settings.parse(sys.argv[1:] if argv is None else argv)
    # kopf's formatters: JSON lines carry the object (namespace/name) a message is about.
    kopf.configure(log_format=kopf.LogFormat.JSON if opts.log_format == "json" else kopf.LogFormat.FULL)
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # "handler succeeded" per event: noise
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per agent status poll is noise
    start_http_server(opts.metrics_port)
    return asyncio.run(run(opts))


if __name__ == "__main__":
    sys.exit(main())
