"""Agent test fixtures: a real redis-server per session, the mock LLM upstream, agent subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from tars_agent.metrics import AgentMetrics
from tars_agent.mockllm import MockConfig, MockLLM
from tars_agent.settings import AgentSettings
from tars_agent.worker import Agent
from tars_contract import contract as c

REDIS_SERVER = "/usr/bin/redis-server"
AGENT_TOKEN = "test-agent-token"  # what the operator would put in the pool's Secret
AUTH = {"Authorization": f"Bearer {AGENT_TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll `predicate` until it holds; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class RedisServer:
    """A redis-server child process on 127.0.0.1; restartable with the same data dir and port."""

    workdir: Path
    persistent: bool = False
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--protected-mode",
            "no",
        ]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=0.5)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_until(up, 10, f"redis-server on port {self.port}")
        finally:
            client.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    yield server
    server.stop()


AGENT_TEST_DIR = Path(__file__).parent


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    http_port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def spawn_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start `tars-agent` subprocesses (python -m tars_agent.worker); all are killed at teardown."""
    started: list[AgentProcess] = []

    def spawn(env: dict[str, str], pod: str) -> AgentProcess:
        port = free_port()
        full_env = {
            **os.environ,
            "TARS_POD_NAME": pod,
            "TARS_HTTP_PORT": str(port),
            "TARS_HTTP_BIND": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        log_path = tmp_path / f"{pod}.log"
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tars_agent.worker"],
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        agent = AgentProcess(proc, port, log_path)
        started.append(agent)
        return agent

    yield spawn
    for agent in started:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait(timeout=10)


@pytest.fixture
async def mock_llm() -> AsyncIterator[MockLLM]:
    mock = MockLLM(MockConfig())
    await mock.start()
    yield mock
    await mock.stop()


def agent_settings(redis_url: str, llm_url: str, **overrides: object) -> AgentSettings:
    """Settings for an in-process agent of a fresh pool."""
    values: dict[str, object] = {
        "pool": f"p{uuid.uuid4().hex[:8]}",
        "namespace": "test",
        "pod_name": f"agent-{uuid.uuid4().hex[:6]}",
        "redis_url": redis_url,
        "llm_base_url": llm_url,
        "http_port": free_port(),
        "http_bind": "127.0.0.1",
        "claim_idle_seconds": 2.0,
        "drain_grace_seconds": 5.0,
        "task_timeout_seconds": 30.0,
        "agent_token": AGENT_TOKEN,
    }
    values.update(overrides)
    return AgentSettings.model_validate(values)


@contextlib.asynccontextmanager
async def running_agent(settings: AgentSettings) -> AsyncIterator[Agent]:
    agent = Agent(settings, metrics=AgentMetrics(process_collector=False))
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, timeout=30)


def agent_env(settings: AgentSettings) -> dict[str, str]:
    """The environment that configures a `tars-agent` subprocess like `settings`."""
    s = settings
    env = {
        c.ENV_POOL: s.pool,
        c.ENV_NAMESPACE: s.namespace,
        c.ENV_REDIS_URL: s.redis_url,
        c.ENV_LLM_BASE_URL: s.llm_base_url,
        c.ENV_CONCURRENCY: str(s.concurrency),
        c.ENV_DRAIN_GRACE_SECONDS: str(s.drain_grace_seconds),
        c.ENV_CLAIM_IDLE_SECONDS: str(s.claim_idle_seconds),
        c.ENV_MAX_ATTEMPTS: str(s.max_attempts),
        "TARS_TASK_TIMEOUT_SECONDS": str(s.task_timeout_seconds),
        c.ENV_BUDGET: s.budget,
    }
    if s.burst_fraction is not None:
        env["TARS_BURST_FRACTION"] = str(s.burst_fraction)
    if s.requests_per_minute:
        env[c.ENV_REQUESTS_PER_MINUTE] = str(s.requests_per_minute)
    if s.tokens_per_minute:
        env[c.ENV_TOKENS_PER_MINUTE] = str(s.tokens_per_minute)
    return env
