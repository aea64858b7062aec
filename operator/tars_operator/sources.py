"""What the operator reads besides the API server: Prometheus and the agents.

Both are I/O edges of the reconcile; they never raise into it: a failure is
returned as data (a missing sample with the error text, an unknown in-flight
count), so the pure policy decides what a missing value means.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass

import httpx
from prometheus_api_client import PrometheusConnect
from urllib3.util.retry import Retry

from tars_agent import contract
from tars_operator.policy.metrics import Sample


@dataclass(frozen=True)
class QueryResult:
    sample: Sample | None
    error: str | None = None


class PrometheusReader:
    """Instant queries through prometheus-api-client (sync; run in a thread)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        # No retries inside a query: the pool's loop asks again next cycle, and the client's
        # default back-off (2 s, 4 s, ...) stalled every reconcile while Prometheus was down.
        self._prom = PrometheusConnect(url=url, disable_ssl=True, timeout=timeout, retry=Retry(total=0))

    def _query(self, promql: str) -> QueryResult:
        try:
            result = self._prom.custom_query(promql)
        except Exception as exc:  # noqa: BLE001 - connection errors, HTTP 4xx/5xx and bad PromQL alike
            return QueryResult(None, f"query {promql!r} against {self.url} failed: {exc}"[:2000])
        if not result:
            return QueryResult(None, None)
        at, value = result[0]["value"]
        try:
            number = float(value)
        except ValueError:
            return QueryResult(None, f"query {promql!r} returned a non-number {value!r}")
        if number != number:  # NaN: e.g. a rate over no samples
            return QueryResult(None, None)
        return QueryResult(Sample(number, dt.datetime.fromtimestamp(float(at), dt.UTC)))

    async def query(self, promql: str) -> QueryResult:
        return await asyncio.to_thread(self._query, promql)

    def _range(self, promql: str, window: dt.timedelta, step: dt.timedelta) -> list[Sample]:
        end = dt.datetime.now(dt.UTC)
        try:
            series = self._prom.custom_query_range(
                promql, start_time=end - window, end_time=end, step=str(max(1, int(step.total_seconds())))
            )
        except Exception:  # noqa: BLE001 - no samples is what the memory policy handles
            return []
        return [
            Sample(float(value), dt.datetime.fromtimestamp(float(at), dt.UTC))
            for one in series
            for at, value in one["values"]
            if value not in ("NaN", "+Inf", "-Inf")
        ]

    async def query_range(self, promql: str, window: dt.timedelta, step: dt.timedelta) -> list[Sample]:
        """Every sample of every series in the window; empty when the query fails."""
        return await asyncio.to_thread(self._range, promql, window, step)


class AgentClient:
    """The agent's HTTP side of the contract: GET /status and POST /drain."""

    def __init__(self, timeout: float = 1.0) -> None:
        self._http = httpx.AsyncClient(timeout=timeout)

    async def close(self) -> None:
        await self._http.aclose()

    async def inflight(self, pod_ip: str | None) -> int | None:
        """The agent's in-flight task count; None when it cannot tell (not reached, bad answer)."""
        if not pod_ip:
            return None
        try:
            resp = await self._http.get(f"http://{pod_ip}:{contract.HTTP_PORT}{contract.PATH_STATUS}")
            resp.raise_for_status()
            return int(resp.json()["inflight"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    async def drain(self, pod_ip: str | None) -> str | None:
        """Ask the agent to stop taking work; the error text when it could not be told."""
        if not pod_ip:
            return "the pod has no IP"
        try:
            resp = await self._http.post(f"http://{pod_ip}:{contract.HTTP_PORT}{contract.PATH_DRAIN}")
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            return f"POST {contract.PATH_DRAIN} to {pod_ip} failed: {exc}"
        return None
