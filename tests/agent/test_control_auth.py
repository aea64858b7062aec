"""The agent's control endpoints need the pool's token; probes and scrapes stay open (issue 8, item 12).

A real Agent's http_app served on a local port; no Redis or upstream is contacted.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web

from tars_agent.metrics import AgentMetrics
from tars_agent.settings import SettingsError, load_settings
from tars_agent.worker import Agent
from tars_contract import contract
from tars_operator.sources import AgentClient

from .conftest import agent_settings

TOKEN = "pool-token-0123456789abcdef"


@contextlib.asynccontextmanager
async def served(
    token: str | None, host: str = "127.0.0.1"
) -> AsyncIterator[tuple[Agent, httpx.AsyncClient]]:
    """An agent's HTTP side on `host` (the queue loops do not run); the client's base_url is it."""
    settings = agent_settings("redis://127.0.0.1:1/0", "http://127.0.0.1:1/v1", agent_token=token)
    agent = Agent(settings, metrics=AgentMetrics(process_collector=False))
    runner = web.AppRunner(agent.http_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    try:
        async with httpx.AsyncClient(base_url=site.name) as http:
            yield agent, http
    finally:
        await runner.cleanup()
        await agent.llm.aclose()
        await agent.redis.aclose()
        await agent.limiter_redis.aclose()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({}, "missing Authorization: Bearer <token> header"),
        ({"Authorization": TOKEN}, "missing Authorization: Bearer <token> header"),
        ({"Authorization": f"Basic {TOKEN}"}, "missing Authorization: Bearer <token> header"),
        (bearer("guessed-token"), "invalid token"),
        (bearer(TOKEN[:-1]), "invalid token"),
    ],
    ids=["no-header", "no-scheme", "basic", "wrong-token", "prefix-of-token"],
)
async def test_drain_without_the_pools_token_is_refused_and_the_agent_keeps_working(
    headers: dict[str, str], problem: str
) -> None:
    async with served(TOKEN) as (agent, http):
        response = await http.post(contract.PATH_DRAIN, headers=headers)
        assert response.status_code == 401, response.text
        assert response.text == problem
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert TOKEN not in response.text
        assert agent.draining is False
        status = await http.get(contract.PATH_STATUS, headers=headers)
        assert (status.status_code, status.text) == (401, problem)


async def test_the_pools_token_drains_and_reads_status() -> None:
    async with served(TOKEN) as (agent, http):
        status = await http.get(contract.PATH_STATUS, headers=bearer(TOKEN))
        slots = agent.settings.concurrency
        assert status.status_code == 200
        assert status.json() == {"inflight": 0, "draining": False, "slots": slots}
        drained = await http.post(contract.PATH_DRAIN, headers={"Authorization": f"bearer {TOKEN}"})
        assert drained.status_code == 202
        assert drained.json() == {"inflight": 0, "draining": True, "slots": slots}
        assert agent.draining is True


async def test_probes_and_metrics_need_no_token() -> None:
    async with served(TOKEN) as (agent, http):
        assert (await http.get(contract.PATH_HEALTHZ)).status_code == 200
        agent.redis_ready = True
        assert (await http.get(contract.PATH_READYZ)).status_code == 200
        metrics = await http.get(contract.PATH_METRICS)
        assert metrics.status_code == 200 and "tars_agent_busy" in metrics.text


async def test_an_agent_without_a_token_refuses_every_control_request() -> None:
    async with served(None) as (agent, http):
        for headers in ({}, {"Authorization": "Bearer"}, bearer("anything")):
            response = await http.post(contract.PATH_DRAIN, headers=headers)
            assert response.status_code == 503
            assert response.text == f"control endpoints disabled: {contract.ENV_AGENT_TOKEN} is not set"
        assert (await http.get(contract.PATH_STATUS)).status_code == 503
        assert agent.draining is False


def test_the_token_comes_from_the_environment_and_is_never_shown() -> None:
    settings = load_settings({contract.ENV_AGENT_TOKEN: TOKEN})
    assert settings.agent_token is not None and settings.agent_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(settings)
    with pytest.raises(SettingsError) as error:
        load_settings({contract.ENV_AGENT_TOKEN: TOKEN, contract.ENV_CONCURRENCY: "0"})
    assert TOKEN not in str(error.value)


def port_of(http: httpx.AsyncClient) -> int:
    port = http.base_url.port
    assert port is not None
    return port


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
async def test_the_operators_client_reads_and_drains_an_agent_with_the_pools_token(host: str) -> None:
    async with served(TOKEN, host) as (agent, http):
        owner = AgentClient(port=port_of(http))
        try:
            client = owner.for_pool(TOKEN)
            state = await client.state(host)
            assert state is not None and (state.inflight, state.draining) == (0, False)
            assert state.slots == agent.settings.concurrency  # its free slots are warm room
            assert await client.drain(host) is None
            assert agent.draining is True
        finally:
            await owner.close()


async def test_the_operators_client_with_another_pools_token_is_refused_and_says_why() -> None:
    async with served(TOKEN, "::1") as (agent, http):
        owner = AgentClient(port=port_of(http))
        try:
            client = owner.for_pool("token-of-another-pool")
            assert await client.state("::1") is None
            assert await client.drain("::1") == "POST /drain to ::1 failed: 401 invalid token"
            assert await owner.drain("::1") == (
                "POST /drain to ::1 failed: 401 missing Authorization: Bearer <token> header"
            )
            assert agent.draining is False
        finally:
            await owner.close()


async def test_an_unreachable_ipv6_pod_is_an_unknown_count_and_a_drain_error_not_an_exception() -> None:
    client = AgentClient(timeout=0.2)
    try:
        assert client.url("fd00:10:244::7", contract.PATH_STATUS) == "http://[fd00:10:244::7]:8080/status"
        assert await client.state("fd00:10:244::7") is None
        error = await client.drain("fd00:10:244::7")
        assert error is not None and error.startswith("POST /drain to fd00:10:244::7 failed: ")
    finally:
        await client.close()
