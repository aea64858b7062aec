"""The stand-in for 2,000 agents of bench/operator_scale.py: one process answering every simulated
agent pod's control API and publishing their metrics.

kwok gives each simulated pod an IP in 127.1.0.0/16 inside the benchmark's own network namespace,
so this one server bound to 0.0.0.0:<agent port> receives the operator's GET /status and
POST /drain for all of them; it tells the pods apart by the address a request was sent to. As the
agent does (tars_agent.worker), it refuses a request without the pool's bearer token
(security.agent_token: HMAC of the operator's key over namespace/name/uid).

Like every agent it publishes its state (contract.agent_state_key) to --redis-url, pipelined for
all simulated pods. On --exporter-port it serves /metrics with the series an agent exports
(tars_queue_depth with the pool and priority labels, tars_agent_busy,
process_resident_memory_bytes) for every simulated pod, labelled namespace and pod as
Prometheus' Kubernetes discovery would (the scrape job uses honor_labels), plus /control
(POST {"pool": depth}: set a pool's queue depth, exported and as that many waiting tasks in the
pool's queue in Redis, which the operator counts itself) and /stats (the requests it answered). It
learns the pods by a watch and the pools' uids by listing them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from tars_contract import contract, metric_names
from tars_operator import builders
from tars_operator.security import agent_token

AGENT_RSS_BYTES = 80 * 1024 * 1024  # what an idle agent's process collector reports, roughly


@dataclass
class Agents:
    namespace: str
    token_key: bytes
    pods: dict[str, tuple[str, str]] = field(default_factory=dict)  # pod IP -> (pool, pod name)
    ips: dict[str, str] = field(default_factory=dict)  # pod name -> its IP
    tokens: dict[str, str] = field(default_factory=dict)  # pool -> its agents' token
    draining: set[str] = field(default_factory=set)  # pod IPs told to drain
    queue: dict[str, float] = field(default_factory=dict)  # pool -> queue depth
    counts: dict[str, int] = field(
        default_factory=lambda: {"status": 0, "drain": 0, "refused": 0, "unknown_pod": 0}
    )
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # a drain: publish at once
    _exposition: bytes | None = None

    def set_pools(self, pools: list[dict[str, Any]]) -> None:
        self.tokens = {
            p["metadata"]["name"]: agent_token(
                self.token_key, builders.PoolRef(p["metadata"]["name"], self.namespace, p["metadata"]["uid"])
            )
            for p in pools
        }

    def pod_event(self, kind: str, pod: dict[str, Any]) -> None:
        """A watch event (ADDED, MODIFIED, DELETED) of an agent pod."""
        name = pod["metadata"]["name"]
        old_ip = self.ips.pop(name, None)
        if old_ip is not None:
            self.pods.pop(old_ip, None)
        ip = (pod.get("status") or {}).get("podIP")
        if kind != "DELETED" and ip and not pod["metadata"].get("deletionTimestamp"):
            self.pods[ip] = (pod["metadata"]["labels"][contract.POOL_LABEL], name)
            self.ips[name] = ip
        elif old_ip is not None:
            self.draining.discard(old_ip)
        self._exposition = None

    def set_queue(self, depths: dict[str, float]) -> None:
        self.queue.update(depths)
        self._exposition = None

    @property
    def exposition(self) -> bytes:
        """The agents' series, rendered again only after a change."""
        if self._exposition is None:
            self._exposition = self._render()
        return self._exposition

    def _render(self) -> bytes:
        ns = self.namespace
        lines = [
            f"# TYPE {metric_names.QUEUE_DEPTH} gauge",
            f"# TYPE {metric_names.AGENT_BUSY} gauge",
            "# TYPE process_resident_memory_bytes gauge",
        ]
        for pool, pod in self.pods.values():
            depth = self.queue.get(pool, 0.0)
            labels = f'namespace="{ns}",pod="{pod}",pool="{pool}",priority="normal"'
            lines.append(f"{metric_names.QUEUE_DEPTH}{{{labels}}} {depth}")
            lines.append(f'{metric_names.AGENT_BUSY}{{namespace="{ns}",pod="{pod}"}} 0')
            lines.append(f'process_resident_memory_bytes{{namespace="{ns}",pod="{pod}"}} {AGENT_RSS_BYTES}')
        return ("\n".join(lines) + "\n").encode()

    def authorize(self, request: web.Request) -> tuple[str, web.Response | None]:
        """The pod the request was sent to, and the refusal an agent would give (None: allowed)."""
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        ip = sockname[0] if sockname else ""
        pod = self.pods.get(ip)
        if pod is None:
            self.counts["unknown_pod"] += 1
            return ip, web.Response(status=503, text="no simulated agent at this address yet")
        expected = self.tokens.get(pod[0])
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if expected is None or scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), expected):
            self.counts["refused"] += 1
            return ip, web.Response(status=401, text="invalid token", headers={"WWW-Authenticate": "Bearer"})
        return ip, None

    def status(self, ip: str) -> dict[str, object]:
        return {"inflight": 0, "draining": ip in self.draining}


def agent_app(agents: Agents) -> web.Application:
    async def status(request: web.Request) -> web.Response:
        agents.counts["status"] += 1
        ip, refused = agents.authorize(request)
        return refused or web.json_response(agents.status(ip))

    async def drain(request: web.Request) -> web.Response:
        agents.counts["drain"] += 1
        ip, refused = agents.authorize(request)
        if refused:
            return refused
        agents.draining.add(ip)
        agents.changed.set()
        return web.json_response(agents.status(ip), status=202)

    app = web.Application()
    app.router.add_get(contract.PATH_STATUS, status)
    app.router.add_post(contract.PATH_DRAIN, drain)
    return app


async def put_queue(redis: aioredis.Redis, namespace: str, depths: dict[str, float]) -> None:
    """Each pool's queue in Redis, as that many waiting tasks nobody takes: with the default query
    on the default Redis the operator plans with its own count there, not Prometheus' copy."""
    async with redis.pipeline(transaction=True) as pipe:
        for pool, depth in depths.items():
            stream = contract.queue_stream_key(namespace, pool, "normal")
            pipe.delete(stream)
            pipe.xgroup_create(stream, contract.QUEUE_GROUP, id="0", mkstream=True)
            for n in range(int(depth)):
                pipe.xadd(stream, {"bench-placeholder": str(n)})
        await pipe.execute()


def exporter_app(agents: Agents, redis: aioredis.Redis) -> web.Application:
    async def metrics(_r: web.Request) -> web.Response:
        return web.Response(body=agents.exposition, content_type="text/plain")

    async def control(request: web.Request) -> web.Response:
        depths = {str(k): float(v) for k, v in (await request.json()).items()}
        await put_queue(redis, agents.namespace, depths)
        agents.set_queue(depths)
        return web.json_response(agents.queue)

    async def stats(_r: web.Request) -> web.Response:
        return web.json_response({**agents.counts, "pods": len(agents.pods)})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/control", control)
    app.router.add_get("/stats", stats)
    return app


async def watch_pods(agents: Agents, api: httpx.AsyncClient) -> None:
    """List once, then watch the agent pods from where the last event left off (and list the pools
    for their tokens): a list of 2,000 pods every so often would cost the API server more than the
    operator under test. Lists again only when the API server says the version is gone."""
    pods_path = f"/api/v1/namespaces/{agents.namespace}/pods"
    pools_path = f"/apis/tars.dev/v1alpha1/namespaces/{agents.namespace}/agentpools"
    selector = {"labelSelector": contract.POOL_LABEL}
    version: str | None = None
    while True:
        try:
            pools = await api.get(pools_path)
            pools.raise_for_status()
            agents.set_pools(pools.json()["items"])
            if version is None:
                listed = await api.get(pods_path, params=selector)
                listed.raise_for_status()
                body = listed.json()
                agents.pods.clear()
                agents.ips.clear()
                for pod in body["items"]:
                    agents.pod_event("ADDED", pod)
                version = body["metadata"]["resourceVersion"]
            params = {**selector, "watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true"}
            async with api.stream("GET", pods_path, params=params, timeout=None) as stream:
                async for line in stream.aiter_lines():
                    event = json.loads(line)
                    if event["type"] == "ERROR":
                        version = None  # e.g. 410 Gone: list again
                        break
                    version = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] == "BOOKMARK":
                        continue
                    agents.pod_event(event["type"], event["object"])
                    if event["object"]["metadata"]["labels"][contract.POOL_LABEL] not in agents.tokens:
                        break  # a pool created since the last list: list the pools again
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            print(f"[standin] watching pods failed: {exc!r}; watching again", flush=True)
            await asyncio.sleep(1.0)


async def publish_states(agents: Agents, redis: aioredis.Redis) -> None:
    """What every agent does (tars_agent.worker): its state in Redis, refreshed before it expires;
    a drain is published at once (Agents.changed)."""
    while True:
        async with redis.pipeline(transaction=False) as pipe:
            for ip, (pool, pod) in list(agents.pods.items()):
                key = contract.agent_state_key(agents.namespace, pool, pod)
                pipe.set(key, json.dumps(agents.status(ip)), ex=contract.AGENT_STATE_TTL_SECONDS)
            try:
                await pipe.execute()
            except (RedisError, OSError) as exc:
                print(f"[standin] publishing the agents' states failed: {exc}", flush=True)
        agents.changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(contract.AGENT_STATE_REFRESH_SECONDS):
                await agents.changed.wait()


async def serve(args: argparse.Namespace) -> None:
    agents = Agents(args.namespace, args.token_key.encode())
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    redis = aioredis.Redis.from_url(args.redis_url)
    runners = []
    for app, host, port in (
        (agent_app(agents), "0.0.0.0", args.agent_port),
        (exporter_app(agents, redis), "127.0.0.1", args.exporter_port),
    ):
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port, backlog=4096).start()
        runners.append(runner)
    print(
        f"[standin] agents on 0.0.0.0:{args.agent_port}, exporter on 127.0.0.1:{args.exporter_port}",
        flush=True,
    )
    async with httpx.AsyncClient(base_url=args.api_url, verify=ctx, timeout=30.0) as api:
        await asyncio.gather(watch_pods(agents, api), publish_states(agents, redis))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api-url", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--agent-port", type=int, default=contract.HTTP_PORT)
    parser.add_argument("--exporter-port", type=int, default=9400)
    parser.add_argument("--redis-url", required=True, help="the agents' Redis (states, queues)")
    args = parser.parse_args()
    # The operator's key, from the environment as the operator takes it (never a flag: ps shows flags).
    args.token_key = os.environ["TARS_AGENT_TOKEN_KEY"]
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
