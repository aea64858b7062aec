"""What the operator reads besides the API server: Prometheus and the agents (their state as
they publish it in Redis, and their HTTP side).

Both are I/O edges of the reconcile; they never raise into it: a failure is
returned as data (a missing sample with the error text, an unknown in-flight
count), so the pure policy decides what a missing value means.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tars_contract import contract
from tars_operator.policy.metrics import Sample


@dataclass(frozen=True)
class QueryResult:
    sample: Sample | None
    error: str | None = None


class PrometheusReader:
    """Instant queries against Prometheus' HTTP API (/api/v1/query).

    A GET of JSON needs no client library. prometheus-api-client, used before, is synchronous: every
    query took a thread of asyncio's default executor, which all pools share, and it brought
    requests, dateparser, regex and pytz along (at 2,000 agents the operator's RSS went from 172 to
    153 MB without it: bench/README.md, operator_scale)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        # No retries inside a query: the pool's loop asks again next cycle (a back-off inside
        # one query once stalled every reconcile while Prometheus was down).
        # Prometheus runs 20 queries at once by default (--query.max-concurrency): more connections
        # would only wait there. All of them kept alive, so none is opened again per cycle.
        connections = httpx.Limits(max_connections=20, max_keepalive_connections=20)
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout, limits=connections)

    async def close(self) -> None:
        await self._http.aclose()

    async def _get(self, path: str, params: dict[str, str]) -> Any:
        """The answer's `data`; raises PrometheusError naming the cause."""
        try:
            response = await self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            raise PrometheusError(f"{type(exc).__name__} {exc}".strip()) from exc
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or answer.get("status") != "success":
            # Prometheus' own words when it gave them (bad_data: a parse error), else the status.
            detail = answer.get("error") if isinstance(answer, dict) else None
            kind = answer.get("errorType") if isinstance(answer, dict) else None
            raise PrometheusError(
                f"HTTP {response.status_code}"
                + (f" {kind}: {detail}" if detail else f": {response.text[:200]}")
            )
        return answer.get("data") or {}

    async def query(self, promql: str) -> QueryResult:
        try:
            data = await self._get("/api/v1/query", {"query": promql})
        except PrometheusError as exc:
            return QueryResult(None, f"query {promql!r} against {self.url} failed: {exc}"[:2000])
        result = data.get("result")
        if data.get("resultType") == "scalar":
            value = result
        elif result:
            value = result[0]["value"]
        else:
            return QueryResult(None, None)
        at, text = value
        try:
            number = float(text)
        except ValueError:
            return QueryResult(None, f"query {promql!r} returned a non-number {text!r}")
        if number != number:  # NaN: e.g. a rate over no samples
            return QueryResult(None, None)
        return QueryResult(Sample(number, dt.datetime.fromtimestamp(float(at), dt.UTC)))

    async def query_by_label(self, promql: str, label: str) -> dict[str, Sample]:
        """Each series' sample under its value of `label`; empty when the query fails, a series has
        no such label, or its value is not a number (the caller then has no data, which its policy
        handles)."""
        try:
            data = await self._get("/api/v1/query", {"query": promql})
        except PrometheusError:
            return {}
        samples: dict[str, Sample] = {}
        vector = data.get("result") or [] if data.get("resultType") == "vector" else []
        for series in vector:
            key = series.get("metric", {}).get(label)
            at, text = series["value"]
            if key is None or text in ("NaN", "+Inf", "-Inf"):
                continue
            samples[key] = Sample(float(text), dt.datetime.fromtimestamp(float(at), dt.UTC))
        return samples


class PrometheusError(Exception):
    """A query that Prometheus refused or that did not reach it."""


class AgentClient:
    """The agent's HTTP side of the contract: GET /status and POST /drain, with the pool's token.

    One client per operator holds the connections; `for_pool` gives each pool's controller a
    view that sends that pool's bearer token over the same connections (close the owner only)."""

    def __init__(
        self,
        timeout: float = 1.0,
        *,
        token: str | None = None,
        port: int = contract.HTTP_PORT,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._port = port

    def for_pool(self, token: str) -> AgentClient:
        return AgentClient(token=token, port=self._port, http=self._http)

    async def close(self) -> None:
        await self._http.aclose()

    def url(self, pod_ip: str, path: str) -> str:
        """The agent's URL; an IPv6 pod IP goes in brackets (RFC 3986)."""
        host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
        return f"http://{host}:{self._port}{path}"

    async def state(self, pod_ip: str | None) -> AgentState | None:
        """The agent's GET /status; None when it cannot tell (not reached, bad answer)."""
        if not pod_ip:
            return None
        try:
            resp = await self._http.get(self.url(pod_ip, contract.PATH_STATUS), headers=self._headers)
            resp.raise_for_status()
        except (httpx.HTTPError, httpx.InvalidURL):
            return None
        return parse_agent_state(resp.content)

    async def drain(self, pod_ip: str | None) -> str | None:
        """Ask the agent to stop taking work; the error text when it could not be told."""
        if not pod_ip:
            return "the pod has no IP"
        try:
            resp = await self._http.post(self.url(pod_ip, contract.PATH_DRAIN), headers=self._headers)
            resp.raise_for_status()
        except httpx.HTTPStatusError as exc:
            # The agent's own words (e.g. "invalid token"); it never echoes the token.
            reason = exc.response.text[:200]
            return f"POST {contract.PATH_DRAIN} to {pod_ip} failed: {exc.response.status_code} {reason}"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return f"POST {contract.PATH_DRAIN} to {pod_ip} failed: {exc}"[:1000]
        return None


@dataclass(frozen=True)
class AgentState:
    """What an agent published (contract.agent_state_key): the same as its GET /status."""

    inflight: int
    draining: bool
    slots: int | None = None  # the tasks it may hold now; agents before it was in the contract: None


def parse_agent_state(raw: bytes | str | None) -> AgentState | None:
    """An agent's published state; None when there is none or it is not what the contract says."""
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        inflight, draining, slots = data["inflight"], data["draining"], data.get("slots")
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if type(inflight) is not int or inflight < 0 or type(draining) is not bool:
        return None
    if slots is not None and (type(slots) is not int or slots < 1):
        return None
    return AgentState(inflight, draining, slots)


@dataclass(frozen=True)
class PoolReading:
    """What one round trip to Redis told about a pool: its agents' published states, by pod name
    (None: Redis did not answer, so nobody's is known), and its queue depth (None: not asked for,
    or Redis did not answer)."""

    states: dict[str, AgentState] | None
    queue_depth: Sample | None = None


class AgentStateReader:
    """The agents' published state, read from the default Redis, and the pool's queue depth,
    counted there as the agents count it: one pipeline per pool and second."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def close(self) -> None:
        await self._redis.aclose()

    async def read(self, namespace: str, pool: str, pods: Sequence[str], queue_depth: bool) -> PoolReading:
        """The states of `pods` that published one (an MGET), and with `queue_depth` the tasks
        waiting (not yet taken) in the pool's queue now, as the agents export it in
        tars_queue_depth (contract.WAITING_TASKS_SCRIPT), a second old at most where Prometheus
        holds the agents' value as of their last scrape. One round trip for both.
        When Redis does not answer nothing is known: asking every agent over HTTP instead would
        add a request per agent exactly when the operator or Redis is overloaded."""
        if not pods and not queue_depth:
            return PoolReading({})
        streams = [contract.queue_stream_key(namespace, pool, p) for p in contract.QUEUE_PRIORITIES]
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                if pods:
                    pipe.mget([contract.agent_state_key(namespace, pool, pod) for pod in pods])
                if queue_depth:
                    # EVAL, not EVALSHA: Redis keeps the script compiled by its hash either way,
                    # and a Redis that lost its scripts needs no second round trip
                    pipe.eval(contract.WAITING_TASKS_SCRIPT, len(streams), *streams, contract.QUEUE_GROUP)
                replies = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError):
            return PoolReading(None)
        states: dict[str, AgentState] | None = {}
        if pods:
            values, replies = replies[0], replies[1:]
            states = (
                None
                if isinstance(values, BaseException)
                else {
                    pod: state
                    for pod, raw in zip(pods, values, strict=True)
                    if (state := parse_agent_state(raw))
                }
            )
        return PoolReading(states, _waiting(replies) if queue_depth else None)


def _waiting(replies: Sequence[Any]) -> Sample | None:
    """The queue depth from WAITING_TASKS_SCRIPT's reply (None: it failed); a missing stream
    holds no task."""
    (counts,) = replies
    if isinstance(counts, BaseException):
        return None
    return Sample(float(sum(max(int(n), 0) for n in counts)), dt.datetime.now(dt.UTC))
