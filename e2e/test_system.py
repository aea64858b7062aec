"""The whole system on the local cluster: the operator scales a pool of real
agents (tars-agent, the image's entrypoint run as a local process) on the real
queue depth; the agents take tasks from Redis, call the mock LLM upstream
through the shared limiter, and store every result."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from e2e.harness import eventually, free_port, unique
from e2e.operator_env import OperatorEnv
from tars_agent import contract
from tars_agent.client import TaskClient
from tars_agent.mockllm import MockConfig, MockLLM

UPSTREAM_RPM = 300  # 5 requests/s: the pool must share it


@pytest.fixture
def upstream(op: OperatorEnv) -> Iterator[str]:
    """The mock LLM on the bridge address, where pods reach the host."""
    loop = asyncio.new_event_loop()
    mock = MockLLM(MockConfig(requests_per_minute=UPSTREAM_RPM, latency_s=0.2, response_tokens=8))
    host = op.cluster.cfg.gateway_ip
    port = free_port()
    loop.run_until_complete(mock.start(host, port))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://{host}:{port}"
    asyncio.run_coroutine_threadsafe(mock.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def agent_pool(name: str, upstream: str, budget: str) -> dict[str, Any]:
    agent = {
        "name": "agent",
        # No command: the node runs the image's entrypoint (localcluster/image-commands.yaml).
        "image": "ghcr.io/tars-dev/tars-agent:0.1.0",
        "env": [
            {"name": contract.ENV_LLM_BASE_URL, "value": f"{upstream}/v1"},
            {"name": contract.ENV_CONCURRENCY, "value": "2"},
        ],
    }
    scaling = {
        "interval": "2s",
        "queueDepth": {"threshold": 5, "targetPerAgent": 5},
        "scaleDown": {"stabilizationWindow": "10s"},
    }
    return {
        "apiVersion": "tars.dev/v1alpha1",
        "kind": "AgentPool",
        "metadata": {"name": name},
        "spec": {
            "template": {"spec": {"containers": [agent]}},
            "replicas": {"min": 1, "max": 4},
            "warm": {"min": 1},
            "scaling": scaling,
            "rateLimit": {"budget": budget, "requestsPerMinute": UPSTREAM_RPM},
        },
    }


def test_pool_of_real_agents_scales_on_its_queue_and_completes_every_task_within_budget(
    op: OperatorEnv, namespace: str, upstream: str
) -> None:
    kube, cfg = op.kube, op.cluster.cfg
    kube.apply(agent_pool("system", upstream, unique("budget")), namespace=namespace)
    eventually(
        lambda: [
            p
            for p in kube.pods(namespace, f"{contract.POOL_LABEL}=system")
            if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        ],
        90,
        "the first real agent Ready",
    )

    async def submit_and_wait(n: int) -> list[Any]:
        client = TaskClient(aioredis.from_url(f"redis://127.0.0.1:{cfg.redis_port}/0"), namespace, "system")
        submitted = [
            await client.submit_payload(
                {"messages": [{"role": "user", "content": f"task {i}"}], "max_tokens": 8},
                priority=("critical", "high", "normal", "low")[i % 4],
                idempotency_key=f"e2e-{i}",
            )
            for i in range(n)
        ]
        return list(await asyncio.gather(*(client.wait(s.task_id, 240) for s in submitted)))

    peak_pods = 0

    def watch_pods() -> None:
        nonlocal peak_pods
        while not done.is_set():
            pods = [
                p
                for p in kube.pods(namespace, f"{contract.POOL_LABEL}=system")
                if not p["metadata"].get("deletionTimestamp")
            ]
            peak_pods = max(peak_pods, len(pods))
            done.wait(1)

    done = threading.Event()
    watcher = threading.Thread(target=watch_pods, daemon=True)
    watcher.start()
    try:
        results = asyncio.run(submit_and_wait(60))
    finally:
        done.set()
        watcher.join(10)
    assert [r.status for r in results] == ["done"] * 60
    assert all(r.output for r in results)
    assert peak_pods >= 2, "the backlog should have made the operator add agents"
    log = httpx.get(f"{upstream}/admin/log", timeout=5).json()
    assert len(log["admitted"]) >= 60
    assert log["rejected"] == 0, "the shared limiter kept the pool inside the upstream's limit"
