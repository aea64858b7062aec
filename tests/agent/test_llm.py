"""The LLM client against the mock upstream: circuit breaker, 429 feedback, retries, coalescing."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from e2e.harness import async_eventually
from pydantic import SecretStr

from tars_agent import gcra
from tars_agent.circuit import CircuitBreaker, CircuitOpenError, CircuitState
from tars_agent.limiter import Budget, SharedLimiter, state_key
from tars_agent.llm import (
    DRAIN_AFTER_DONE_S,
    LLMClient,
    LLMConfig,
    UpstreamError,
    backoff_delay,
    upstream_tls,
)
from tars_agent.metrics import AgentMetrics
from tars_agent.mockllm import MockLLM
from tars_agent.tasks import TaskSpec


def spec(text: str = "hello", stream: bool = False, max_tokens: int = 16) -> TaskSpec:
    return TaskSpec.model_validate(
        {"messages": [{"role": "user", "content": text}], "stream": stream, "max_tokens": max_tokens}
    )


async def discard(_text: str) -> None:
    return None


def test_breaker_opens_after_threshold_and_probes_once_when_half_open() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=3, open_seconds=30, clock=lambda: now[0])
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED and breaker.allow()
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN and not breaker.allow()
    assert breaker.retry_after() == 30
    now[0] = 30.0
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.record_failure()  # the probe failed: open again for a full period
    assert breaker.state is CircuitState.OPEN and breaker.retry_after() == 30
    now[0] = 60.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED


def test_backoff_is_full_jitter_capped_and_never_below_retry_after() -> None:
    assert backoff_delay(0, 0.5, 20, None, 1.0) == 0.5
    assert backoff_delay(10, 0.5, 20, None, 1.0) == 20
    assert backoff_delay(3, 0.5, 20, None, 0.0) == 0.0
    assert backoff_delay(3, 0.5, 20, 7.0, 0.1) == 7.0


async def test_circuit_opens_on_a_dead_upstream_and_recovers(mock_llm: MockLLM) -> None:
    mock_llm.config.fail_status = 503
    metrics = AgentMetrics(process_collector=False)
    breaker = CircuitBreaker(failure_threshold=3, open_seconds=0.5)
    client = LLMClient(LLMConfig(base_url=mock_llm.url, max_retries=0), breaker=breaker, metrics=metrics)
    try:
        for _ in range(3):
            with pytest.raises(UpstreamError, match="503"):
                await client.complete(spec(), "normal", discard, time.monotonic() + 5)
        assert breaker.state is CircuitState.OPEN
        assert metrics.circuit_state._value.get() == 2
        with pytest.raises(CircuitOpenError):
            await client.complete(spec(), "normal", discard, time.monotonic() + 5)
        assert len(mock_llm.admitted) == 3  # the open circuit sent nothing
        mock_llm.config.fail_status = 0
        await async_eventually(lambda: breaker.state is CircuitState.HALF_OPEN, 5, "half-open")
        result = await client.complete(spec(), "normal", discard, time.monotonic() + 5)
        assert result.completion_tokens > 0
        assert breaker.state is CircuitState.CLOSED and metrics.circuit_state._value.get() == 0
    finally:
        await client.aclose()


async def test_a_429_pauses_the_whole_budget_in_redis(
    redis_client: aioredis.Redis, redis_url: str, mock_llm: MockLLM
) -> None:
    """Someone outside the pool used up the upstream's limit (1 request / 2 s), so our request gets
    a 429: its Retry-After pauses the budget for every client (here another 'pod'), and the retry
    waits for it instead of hammering the upstream."""
    mock_llm.config.requests_per_minute = 1
    mock_llm.config.window_s = 2.0
    mock_llm._reset_buckets()
    name = f"b429-{uuid.uuid4().hex}"
    budget = Budget.from_rates(name, requests_per_minute=6000)
    pod_a = aioredis.Redis.from_url(redis_url)
    pod_b = aioredis.Redis.from_url(redis_url)
    metrics = AgentMetrics(process_collector=False)
    limiter_a, limiter_b = SharedLimiter(pod_a, budget, metrics=metrics), SharedLimiter(pod_b, budget)
    client = LLMClient(
        LLMConfig(base_url=mock_llm.url, max_retries=3, backoff_base_s=0.01),
        limiter=limiter_a,
        metrics=metrics,
    )
    try:
        async with httpx.AsyncClient() as outsider:
            body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
            assert (await outsider.post(f"{mock_llm.url}/chat/completions", json=body)).status_code == 200
        started = time.monotonic()
        second = asyncio.create_task(client.complete(spec("again"), "normal", discard, time.monotonic() + 10))

        async def paused() -> bool:
            state = gcra.decode_state(await pod_b.get(state_key(name)))
            return state is not None and state.pause_until_us > 0

        await async_eventually(paused, 5, "the budget-wide pause")
        other_pod = await limiter_b.try_acquire("critical", 0)
        assert not other_pod.admitted and other_pod.retry_after_us > 0
        await second
        assert mock_llm.rejected == 1  # one 429, then it waited for the upstream's refill
        assert time.monotonic() - started >= 1.5
        assert metrics.upstream_429.labels(name)._value.get() == 1
    finally:
        await client.aclose()
        await pod_a.aclose()
        await pod_b.aclose()


async def test_identical_inflight_requests_are_coalesced_and_cached(mock_llm: MockLLM) -> None:
    mock_llm.config.latency_s = 0.2
    client = LLMClient(LLMConfig(base_url=mock_llm.url, cache_entries=10))
    try:
        results = await asyncio.gather(
            *(client.complete(spec("same"), "normal", discard, time.monotonic() + 5) for _ in range(5))
        )
        assert len({r.text for r in results}) == 1
        assert len(mock_llm.admitted) == 1
        await client.complete(spec("same"), "normal", discard, time.monotonic() + 5)
        assert len(mock_llm.admitted) == 1  # served from the cache
        await client.complete(spec("different"), "normal", discard, time.monotonic() + 5)
        assert len(mock_llm.admitted) == 2
    finally:
        await client.aclose()


async def test_streamed_calls_reuse_one_connection(mock_llm: MockLLM) -> None:
    """A streamed answer read to its [DONE] leaves the connection fit for the next call. Left
    unread past [DONE] (the chunked body's end), httpx closed it: every call paid a new
    connection, its DNS lookup and, against a real upstream, its TLS handshake."""
    host, port = mock_llm.url.removeprefix("http://").split("/")[0].split(":")
    accepted = 0

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        up_reader, up_writer = await asyncio.open_connection(host, int(port))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
    proxy_port = proxy.sockets[0].getsockname()[1]
    client = LLMClient(LLMConfig(base_url=f"http://127.0.0.1:{proxy_port}/v1"))
    try:
        for i in range(5):
            texts: list[str] = []

            async def keep(text: str) -> None:
                texts.append(text)  # noqa: B023  # read within this iteration

            await client.complete(spec(f"call {i}", stream=True), "normal", keep, time.monotonic() + 5)
            assert texts  # each call streamed its answer
        assert len(mock_llm.admitted) == 5
        assert accepted == 1
    finally:
        await client.aclose()
        proxy.close()


async def test_an_upstream_that_holds_the_stream_open_after_done_does_not_hold_the_call() -> None:
    held = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
        yield b"data: [DONE]\n\n"
        await held.wait()  # never set: the stream stays open

    def answer(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    client = LLMClient(LLMConfig(base_url="http://upstream/v1"), transport=httpx.MockTransport(answer))
    texts: list[str] = []

    async def keep(text: str) -> None:
        texts.append(text)

    try:
        async with asyncio.timeout(10 * DRAIN_AFTER_DONE_S):  # the read timeout is far longer
            await client.complete(spec(stream=True), "normal", keep, time.monotonic() + 60)
        assert texts == ["hi"]
    finally:
        await client.aclose()


async def test_a_connection_broken_after_done_does_not_fail_the_finished_call() -> None:
    """What follows [DONE] is read only to keep the connection: the answer is complete, and a
    reset there (some proxies close a stream so) must not turn it into a retried failure."""

    async def body() -> AsyncIterator[bytes]:
        yield b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
        yield b"data: [DONE]\n\n"
        raise httpx.ReadError("connection reset by peer")

    def answer(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    calls = 0

    def counted(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return answer(request)

    client = LLMClient(LLMConfig(base_url="http://upstream/v1"), transport=httpx.MockTransport(counted))
    texts: list[str] = []

    async def keep(text: str) -> None:
        texts.append(text)

    try:
        await client.complete(spec(stream=True), "normal", keep, time.monotonic() + 60)
        assert (texts, calls) == (["hi"], 1)
    finally:
        await client.aclose()


async def test_api_key_is_sent_but_never_shown(mock_llm: MockLLM, caplog: pytest.LogCaptureFixture) -> None:
    secret = "sk-test-" + uuid.uuid4().hex
    mock_llm.config.api_key = secret
    config = LLMConfig(base_url=mock_llm.url, api_key=SecretStr(secret))
    client = LLMClient(config, breaker=CircuitBreaker())
    caplog.set_level(logging.DEBUG)
    try:
        await client.complete(spec(stream=True), "normal", discard, time.monotonic() + 5)
        assert secret not in repr(config) and secret not in repr(client) and secret not in str(config)
        assert secret not in caplog.text
        wrong = LLMClient(LLMConfig(base_url=mock_llm.url, api_key=SecretStr("nope")))
        with pytest.raises(UpstreamError, match="401"):
            await wrong.complete(spec(), "normal", discard, time.monotonic() + 5)
        await wrong.aclose()
    finally:
        await client.aclose()


async def _serve(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> Any:
    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _failure(base_url: str, read_timeout_s: float = 5.0) -> str:
    client = LLMClient(LLMConfig(base_url=base_url, max_retries=0, read_timeout_s=read_timeout_s))
    try:
        with pytest.raises(UpstreamError) as failed:
            await client.complete(spec(stream=True), "normal", discard, time.monotonic() + 10)
        return str(failed.value)
    finally:
        await client.aclose()


async def test_a_refused_connection_is_named_so_not_a_timeout() -> None:
    """The transport's errors reach the task's last_error: they must name what happened.
    (httpx-aiohttp maps every aiohttp connection error to httpx.ConnectTimeout.)"""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now: connections are refused
    message = await _failure(f"http://127.0.0.1:{port}/v1")
    assert "connection error" in message and "timeout" not in message.lower(), message
    assert str(port) in message, message  # names where it tried


async def test_an_upstream_that_closes_without_answering_is_named_so() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await _serve(hang_up)
    try:
        message = await _failure(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1")
    finally:
        server.close()
    assert "connection error" in message and "disconnected" in message.lower(), message


async def test_an_upstream_that_never_answers_is_named_a_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads until the client gives up

    server = await _serve(silent)
    try:
        message = await _failure(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", 0.3)
    finally:
        server.close()
    assert message.startswith("upstream failed after 1 attempts: timeout ("), message


def test_an_https_upstream_is_verified_and_an_http_one_loads_no_ca_bundle() -> None:
    assert upstream_tls("https://api.openai.com/v1") is True  # httpx's verified context (certifi)
    assert upstream_tls("HTTPS://llm.internal/v1") is True
    plain = upstream_tls("http://mock-llm:8080/v1")
    assert isinstance(plain, ssl.SSLContext)
    # unused for http; were it used, it would check names and certificates and trust no one
    assert (plain.verify_mode, plain.check_hostname, plain.cert_store_stats()["x509_ca"]) == (
        ssl.CERT_REQUIRED,
        True,
        0,
    )
