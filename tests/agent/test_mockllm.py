"""The mock upstream's rate-limit options that benchmarks rely on: the refusal log and
`count_refused` (a refused request uses up the limit too, as OpenAI counts failed requests)."""

from __future__ import annotations

import time

import httpx
import pytest

from tars_agent.mockllm import MockLLM

# A token bucket that refills ~0.3 tokens/s: nothing refills noticeably during a test.
TOKENS_PER_HOUR = 1000


def body(max_tokens: int) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": "x"}], "max_tokens": max_tokens}


@pytest.mark.parametrize(("count_refused", "then"), [(False, 200), (True, 429)])
async def test_a_refused_request_uses_up_the_limit_only_when_told(
    mock_llm: MockLLM, count_refused: bool, then: int
) -> None:
    mock_llm.config.tokens_per_minute = TOKENS_PER_HOUR
    mock_llm.config.window_s = 3600.0
    mock_llm.config.count_refused = count_refused
    mock_llm._reset_buckets()
    async with httpx.AsyncClient(base_url=mock_llm.url) as client:
        assert (await client.post("/chat/completions", json=body(1))).status_code == 200
        before = time.time()
        too_big = await client.post("/chat/completions", json=body(2 * TOKENS_PER_HOUR))
        after = time.time()
        assert too_big.status_code == 429
        # a small request fits in what is left, unless the refused one used it up
        assert (await client.post("/chat/completions", json=body(1))).status_code == then
        log = (await client.get(f"{mock_llm.url.removesuffix('/v1')}/admin/log")).json()
    assert len(log["admitted"]) == (2 if then == 200 else 1)
    assert log["rejected"] == len(log["refused"]) == (1 if then == 200 else 2)
    assert before <= log["refused"][0]["ts"] <= after  # arrival time of the refusal


async def test_reset_clears_the_refusal_log(mock_llm: MockLLM) -> None:
    mock_llm.config.requests_per_minute = 1
    mock_llm.config.window_s = 3600.0
    mock_llm._reset_buckets()
    base = mock_llm.url.removesuffix("/v1")
    async with httpx.AsyncClient(base_url=mock_llm.url) as client:
        statuses = [(await client.post("/chat/completions", json=body(1))).status_code for _ in range(2)]
        assert statuses == [200, 429]
        await client.post(f"{base}/admin/reset")
        log = (await client.get(f"{base}/admin/log")).json()
    assert log == {"admitted": [], "rejected": 0, "refused": []}
