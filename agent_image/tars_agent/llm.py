"""The upstream LLM client: httpx to an OpenAI-compatible chat-completions API.

One pooled keep-alive client per process: httpx's API on aiohttp's HTTP/1.1 connections
(httpx-aiohttp's transport, as the OpenAI SDK's aiohttp backend), or on httpx's own with
HTTP/2. Every attempt first waits for the shared limiter; 429/5xx/timeouts are retried with
exponential backoff and full jitter, with Retry-After as the minimum; a 429
also pauses the whole budget in Redis. A circuit breaker stops calls to a dead
upstream. Streamed responses go to `on_text` chunk by chunk and are not kept
(a plain JSON answer to a streamed request goes to it in one piece).
Identical in-flight non-streamed requests share one call, and an optional
cache keeps non-streamed answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from pydantic import BaseModel, ConfigDict, SecretStr

from tars_agent.cache import BoundedTTLCache
from tars_agent.circuit import CircuitBreaker, CircuitOpenError
from tars_agent.limiter import Reservation, SharedLimiter
from tars_agent.metrics import AgentMetrics
from tars_agent.tasks import TaskSpec

# how long the rest of a streamed body may take to arrive after its [DONE] (see _read_to_end)
DRAIN_AFTER_DONE_S = 0.5

log = logging.getLogger(__name__)

TextSink = Callable[[str], Awaitable[None]]


class LLMConfig(BaseModel):
    model_config = ConfigDict(frozen=True)
    base_url: str
    api_key: SecretStr | None = None  # SecretStr: never shown by repr() or in logs
    model: str = "gpt-4o-mini"
    http2: bool = False
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 120.0
    max_connections: int = 64
    max_keepalive: int = 16
    max_retries: int = 4
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 20.0
    max_response_bytes: int = 4 * 1024 * 1024
    cache_entries: int = 0  # 0 = no response cache
    cache_bytes: int = 8 * 1024 * 1024
    cache_ttl_s: float = 300.0


@dataclass(frozen=True)
class Completion:
    text: str  # empty for streamed responses: their text went to the sink
    prompt_tokens: int
    completion_tokens: int


class UpstreamError(Exception):
    """The upstream refused the request, or kept failing until retries or the deadline ran out."""

    def __init__(self, message: str, status: int | None, retryable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class _RetryableFailure(Exception):
    def __init__(
        self, status: int | None, retry_after_s: float | None, detail: str, circuit_failure: bool
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.retry_after_s = retry_after_s
        self.circuit_failure = circuit_failure
        self.partial_output = False


def estimate_prompt_tokens(spec: TaskSpec) -> int:
    """About 4 characters a token plus per-message framing; reconciled with the real usage later."""
    return sum(math.ceil(len(m.content) / 4) + 4 for m in spec.messages) + 3


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(float(ms) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(float(parsedate_to_datetime(value).timestamp()) - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


def transport_failure(exc: httpx.TransportError) -> str:
    """'timeout (...)' or 'connection error (...)', naming the error underneath: httpx-aiohttp maps
    every aiohttp connection error (refused, reset, disconnected) to httpx.ConnectTimeout."""
    cause = exc.__cause__
    named: BaseException = exc
    timed_out = isinstance(exc, httpx.TimeoutException)
    if isinstance(cause, aiohttp.ClientError | TimeoutError):
        timed_out, named = isinstance(cause, TimeoutError), cause
    detail = f"{type(named).__name__}: {named}" if str(named) else type(named).__name__
    return f"{'timeout' if timed_out else 'connection error'} ({detail})"


def backoff_delay(
    attempt: int, base_s: float, cap_s: float, retry_after_s: float | None, rand: float
) -> float:
    """Full jitter (uniform in [0, min(cap, base * 2^attempt)]), never below Retry-After."""
    jittered = rand * min(cap_s, base_s * 2.0**attempt)
    return max(jittered, retry_after_s or 0.0)


def request_body(spec: TaskSpec, default_model: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": spec.model or default_model,
        "messages": [m.model_dump() for m in spec.messages],
        "max_tokens": spec.max_tokens,
        "stream": spec.stream,
    }
    if spec.temperature is not None:
        body["temperature"] = spec.temperature
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    return body


def upstream_tls(base_url: str) -> ssl.SSLContext | bool:
    """The TLS settings of the upstream's connections: verified against the CA bundle for https.
    An http:// upstream never uses them, so it gets a strict context without the bundle: loading
    it is 19 ms of the ~0.34 s of CPU an agent takes to get ready, paid again by every pod a burst
    starts. Were it ever used, it would trust no certificate: fail closed, never open."""
    if base_url.lower().startswith("https://"):
        return True
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificates and host names


class LLMClient:
    def __init__(
        self,
        config: LLMConfig,
        *,
        limiter: SharedLimiter | None = None,
        breaker: CircuitBreaker | None = None,
        metrics: AgentMetrics | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.limiter = limiter
        self.breaker = breaker or CircuitBreaker()
        self._metrics = metrics
        self._sleep = sleep
        headers = {"Authorization": f"Bearer {config.api_key.get_secret_value()}"} if config.api_key else {}
        limits = httpx.Limits(
            max_connections=config.max_connections, max_keepalive_connections=config.max_keepalive
        )
        if transport is None and not config.http2:
            # httpcore, h11 and anyio cost ~2.5x the CPU per streamed call of aiohttp's C parser:
            # the agent's largest cost per task (bench/agent_cpu.py). aiohttp keeps every idle
            # connection up to max_connections alive (max_keepalive is httpx's own transport's).
            transport = AiohttpTransport(limits=limits, verify=upstream_tls(config.base_url))
        self._http = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/"),
            headers=headers,
            http2=config.http2,
            timeout=httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s),
            limits=limits,
            transport=transport,
        )
        self._inflight: dict[str, asyncio.Future[Completion]] = {}
        self._cache: BoundedTTLCache[Completion] | None = (
            BoundedTTLCache(config.cache_entries, config.cache_bytes, config.cache_ttl_s)
            if config.cache_entries > 0
            else None
        )

    def __repr__(self) -> str:
        return f"LLMClient(base_url={self.config.base_url!r}, model={self.config.model!r})"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def complete(self, spec: TaskSpec, priority: str, on_text: TextSink, deadline: float) -> Completion:
        """Run one chat completion; `deadline` is on time.monotonic()."""
        body = request_body(spec, self.config.model)
        estimate = estimate_prompt_tokens(spec) + spec.max_tokens
        if spec.stream:
            return await self._call(body, priority, estimate, on_text, deadline)
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        if self._cache is not None and (hit := self._cache.get(key)) is not None:
            await on_text(hit.text)
            return hit
        shared = self._inflight.get(key)
        if shared is None:
            shared = asyncio.ensure_future(self._call(body, priority, estimate, None, deadline))
            self._inflight[key] = shared
            shared.add_done_callback(lambda _f: self._inflight.pop(key, None))
        # shield: a cancelled caller must not cancel the call others are waiting on
        result = await asyncio.shield(shared)
        if self._cache is not None:
            self._cache.put(key, result, len(result.text.encode()))
        await on_text(result.text)
        return result

    def _set_circuit_metric(self) -> None:
        if self._metrics:
            self._metrics.circuit_state.set(int(self.breaker.state))

    async def _call(
        self, body: dict[str, Any], priority: str, estimate: int, on_text: TextSink | None, deadline: float
    ) -> Completion:
        attempt = 0
        while True:
            if not self.breaker.allow():
                self._set_circuit_metric()
                raise CircuitOpenError(self.breaker.retry_after())
            reservation: Reservation | None = None
            if self.limiter is not None:
                reservation = await self.limiter.acquire(
                    priority, estimate, max(deadline - time.monotonic(), 0.0)
                )
            try:
                result = await self._send(body, on_text)
            except _RetryableFailure as failure:
                if failure.circuit_failure:
                    self.breaker.record_failure()
                else:
                    self.breaker.record_success()  # a 429 is an alive upstream
                self._set_circuit_metric()
                if self.limiter is not None and failure.status == 429:
                    await self.limiter.pause(failure.retry_after_s or self.config.backoff_base_s)
                    if reservation is not None:
                        await self.limiter.release(reservation)  # refused: no tokens spent
                delay = backoff_delay(
                    attempt,
                    self.config.backoff_base_s,
                    self.config.backoff_cap_s,
                    failure.retry_after_s,
                    random.random(),
                )
                if (
                    failure.partial_output
                    or attempt >= self.config.max_retries
                    or (time.monotonic() + delay > deadline)
                ):
                    raise UpstreamError(
                        f"upstream failed after {attempt + 1} attempts: {failure}",
                        failure.status,
                        retryable=True,
                    ) from failure
                log.info("upstream %s; retry %d in %.2fs", failure, attempt + 1, delay)
                attempt += 1
                await self._sleep(delay)
                continue
            except UpstreamError:
                self.breaker.record_success()
                self._set_circuit_metric()
                raise
            self.breaker.record_success()
            self._set_circuit_metric()
            if self.limiter is not None and reservation is not None:
                await self.limiter.reconcile(reservation, result.prompt_tokens + result.completion_tokens)
            return result

    async def _send(self, body: dict[str, Any], on_text: TextSink | None) -> Completion:
        start = time.monotonic()
        code = "error"
        try:
            if body["stream"]:
                async with self._http.stream("POST", "/chat/completions", json=body) as response:
                    code = str(response.status_code)
                    await self._check(response)
                    if "json" in response.headers.get("content-type", ""):
                        # an upstream that ignores `stream` answers with one plain body
                        await response.aread()
                        plain = self._read_json(response)
                        if on_text is not None and plain.text:
                            await on_text(plain.text)
                        return Completion("", plain.prompt_tokens, plain.completion_tokens)
                    return await self._read_stream(response, on_text)
            response = await self._http.post("/chat/completions", json=body)
            code = str(response.status_code)
            await self._check(response)
            return self._read_json(response)
        except httpx.TransportError as exc:
            raise _RetryableFailure(None, None, transport_failure(exc), circuit_failure=True) from exc
        finally:
            if self._metrics:
                self._metrics.llm_requests.labels(code).inc()
                self._metrics.llm_latency.observe(time.monotonic() - start)

    async def _check(self, response: httpx.Response) -> None:
        if self.limiter is not None:
            await self.limiter.observe_headers(response.headers)
        status = response.status_code
        if status < 400:
            return
        detail = (await response.aread())[:300].decode(errors="replace")
        if status == 429:
            raise _RetryableFailure(
                status,
                parse_retry_after(response.headers),
                f"429 rate limited: {detail}",
                circuit_failure=False,
            )
        if status >= 500 or status == 408:
            raise _RetryableFailure(
                status, parse_retry_after(response.headers), f"{status}: {detail}", circuit_failure=True
            )
        raise UpstreamError(f"upstream refused the request with {status}: {detail}", status, retryable=False)

    def _read_json(self, response: httpx.Response) -> Completion:
        if len(response.content) > self.config.max_response_bytes:
            raise UpstreamError(f"response of {len(response.content)} bytes exceeds the limit", None, False)
        try:
            data = response.json()
            text = data["choices"][0]["message"].get("content") or ""
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise UpstreamError(
                f"malformed response from upstream: {exc!r}", response.status_code, False
            ) from exc
        return Completion(text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))

    async def _read_stream(self, response: httpx.Response, on_text: TextSink | None) -> Completion:
        """Server-sent events: pass each delta on; only the usage counters are kept."""
        prompt_tokens = completion_tokens = chunks = events = 0
        emitted = False
        lines = response.aiter_lines()
        try:
            async for line in lines:
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                events += 1
                if data == "[DONE]":
                    await _read_to_end(lines)
                    break
                event = json.loads(data)
                usage = event.get("usage")
                if usage:
                    prompt_tokens = int(usage.get("prompt_tokens", 0))
                    completion_tokens = int(usage.get("completion_tokens", 0))
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text and on_text is not None:
                        await on_text(text)
                        emitted = True
                        chunks += 1
        except (httpx.TransportError, ValueError) as exc:
            failure = _RetryableFailure(None, None, f"stream broken: {exc!r}", circuit_failure=True)
            failure.partial_output = emitted  # text already went out: the task must restart, not this call
            raise failure from exc
        if not events:
            content_type = response.headers.get("content-type", "no content type")
            raise UpstreamError(
                f"upstream answered a streamed request with no server-sent events ({content_type})",
                response.status_code,
                retryable=False,
            )
        return Completion("", prompt_tokens, completion_tokens or chunks)


async def _read_to_end(rest: AsyncIterator[str]) -> None:
    """Read what follows [DONE] (the chunked body's last, empty chunk): a response left unread
    closes its connection, and the next call would pay a new one (a DNS lookup, and a TLS handshake
    against a real upstream). An upstream that keeps the stream open after [DONE] gets
    DRAIN_AFTER_DONE_S; the connection is dropped then. The answer is complete by now: what
    breaks here only costs the connection."""
    with contextlib.suppress(TimeoutError, httpx.TransportError, httpx.StreamError, ValueError):
        async with asyncio.timeout(DRAIN_AFTER_DONE_S):
            async for _ in rest:
                pass
