"""The whole system in the cluster, from our images: the operator (installed by the chart)
scales a pool of real agents on the real queue depth; the agents take tasks from the chart's
Redis, call the mock LLM upstream (a Deployment, reached by its Service name) through the
shared limiter, and store every result."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from e2e.harness import IMAGES, Kube, eventually, is_ready, unique
from e2e.operator_env import OperatorEnv
from tars_agent.client import TaskClient
from tars_contract import contract

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_RPM = 300  # 5 requests/s: the pool must share it


@pytest.fixture
def upstream(kube: Kube, namespace: str) -> Iterator[str]:
    """The mock LLM of examples/mock-llm.yaml in the test's namespace, at this test's rate limit."""
    manifests = list(yaml.safe_load_all((REPO / "examples" / "mock-llm.yaml").read_text()))
    container = manifests[0]["spec"]["template"]["spec"]["containers"][0]
    container["image"] = IMAGES.agent
    container["args"] = [
        "--host=0.0.0.0",
        "--port=8000",
        f"--requests-per-minute={UPSTREAM_RPM}",
        "--latency=0.2",
        "--response-tokens=8",
    ]
    kube.apply(*manifests, namespace=namespace)
    kube.run("rollout", "status", "deployment/mock-llm", "-n", namespace, "--timeout=120s")
    yield f"http://mock-llm.{namespace}.svc:8000"


def upstream_log(kube: Kube, namespace: str) -> dict[str, Any]:
    log: dict[str, Any] = json.loads(kube.service_get(namespace, "mock-llm", 8000, "/admin/log"))
    return log


def agent_pool(name: str, upstream: str, budget: str) -> dict[str, Any]:
    agent = {
        "name": "agent",
        "image": IMAGES.agent,  # the image's own entrypoint: the tars-agent worker
        "imagePullPolicy": "IfNotPresent",
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
    kube = op.kube
    kube.apply(agent_pool("system", upstream, unique("budget")), namespace=namespace)
    eventually(
        lambda: [p for p in kube.pods(namespace, f"{contract.POOL_LABEL}=system") if is_ready(p)],
        90,
        "the first real agent Ready",
    )

    password = op.redis_password()

    async def submit_and_wait(port: int, n: int) -> list[Any]:
        redis = aioredis.from_url(f"redis://127.0.0.1:{port}/0", password=password)
        client = TaskClient(redis, namespace, "system")
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
        with kube.port_forward(op.namespace, f"svc/{op.release}-redis", 6379) as port:
            results = asyncio.run(submit_and_wait(port, 60))
    finally:
        done.set()
        watcher.join(10)
    assert [r.status for r in results] == ["done"] * 60
    assert all(r.output for r in results)
    assert peak_pods >= 2, "the backlog should have made the operator add agents"
    log = upstream_log(kube, namespace)
    assert len(log["admitted"]) >= 60
    assert log["rejected"] == 0, "the shared limiter kept the pool inside the upstream's limit"
