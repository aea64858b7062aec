"""Pure parts of the agent process: memory admission, settings, cache, and the `tars` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tars_agent.cache import BoundedTTLCache
from tars_agent.memory import cgroup_memory_limit
from tars_agent.settings import SettingsError, load_settings
from tars_contract import contract

from .conftest import RedisServer


def test_cgroup_limit_v2_v1_and_unlimited(tmp_path: Path) -> None:
    v2, v1 = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    assert cgroup_memory_limit(v2, v1) is None
    v1.write_text("9223372036854771712\n")
    assert cgroup_memory_limit(v2, v1) is None
    v1.write_text("536870912\n")
    assert cgroup_memory_limit(v2, v1) == 512 * 1024 * 1024
    v2.write_text("max\n")
    assert cgroup_memory_limit(v2, v1) is None
    v2.write_text("268435456\n")
    assert cgroup_memory_limit(v2, v1) == 256 * 1024 * 1024


def test_settings_errors_name_the_variable_not_the_secret() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"TARS_CONCURRENCY": "0", "TARS_LLM_API_KEY": "sk-secret", "TARS_HTTP_PORT": "http"})
    assert "TARS_CONCURRENCY" in str(info.value) and "TARS_HTTP_PORT" in str(info.value)
    assert "sk-secret" not in str(info.value)
    settings = load_settings({"TARS_LLM_API_KEY": "sk-secret", "TARS_POOL": "p"}, concurrency=7)
    assert settings.concurrency == 7 and settings.pool == "p" and "sk-secret" not in repr(settings)


def test_cache_evicts_by_entries_bytes_and_ttl() -> None:
    now = [0.0]
    cache: BoundedTTLCache[str] = BoundedTTLCache(max_entries=2, max_bytes=10, ttl_s=5, clock=lambda: now[0])
    cache.put("a", "aaaa", 4)
    cache.put("b", "bbbb", 4)
    assert cache.get("a") == "aaaa"  # a is now the most recent
    cache.put("c", "cc", 2)
    assert cache.get("b") is None and len(cache) == 2
    cache.put("d", "dddddd", 6)  # 4 + 2 + 6 > 10 bytes: the oldest go
    assert cache.bytes <= 10 and cache.get("d") == "dddddd"
    now[0] = 6.0
    assert cache.get("d") is None and cache.bytes <= 10
    cache.put("huge", "x" * 11, 11)
    assert cache.get("huge") is None


def tars(
    redis_server: RedisServer,
    *args: str,
    stdin: str = "",
    pool: str = "cli",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tars_agent.cli", "--redis-url", redis_server.url, "--pool", pool, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_cli_submit_refuses_bad_payloads_and_reports_the_queue(redis_server: RedisServer) -> None:
    bad = tars(redis_server, "submit", "--file", "-", stdin=json.dumps({"messages": [{"role": "x"}]}))
    assert bad.returncode == 2
    assert "messages.0.role" in bad.stderr and "messages.0.content: Field required" in bad.stderr
    ok = tars(redis_server, "submit", "--prompt", "hello", "--priority", "high", "--idempotency-key", "k1")
    assert ok.returncode == 0, ok.stderr
    task_id = ok.stdout.strip()
    again = tars(redis_server, "submit", "--prompt", "hello", "--idempotency-key", "k1")
    assert again.stdout.startswith(task_id) and "already submitted" in again.stdout
    status = tars(redis_server, "result", task_id)
    assert status.returncode == 0 and "queued" in status.stdout
    assert tars(redis_server, "result", "nope").returncode == 1
    stats = json.loads(tars(redis_server, "queue").stdout)
    assert stats["waiting"]["high"] >= 1 and stats["max_depth"] == 500
    timed_out = tars(redis_server, "result", task_id, "--wait", "--timeout", "0.3")
    assert timed_out.returncode == 4 and "not finished" in timed_out.stderr


def test_cli_submit_holds_the_pool_limit_it_is_given_with_no_agent_running(redis_server: RedisServer) -> None:
    pool = f"cli-{uuid.uuid4().hex[:8]}"
    limit = {contract.ENV_QUEUE_MAX_DEPTH: "2"}  # as in an agent pod: the operator's spec.queue.maxDepth
    codes = [tars(redis_server, "submit", "--prompt", "x", pool=pool, env=limit).returncode for _ in range(3)]
    assert codes == [0, 0, 3]
    full = tars(redis_server, "submit", "--prompt", "x", "--max-depth", "1", pool=pool)
    assert full.returncode == 3 and "is full (2 tasks, maximum 1); retry after 60s" in full.stderr
    bad = tars(redis_server, "submit", "--prompt", "x", "--max-depth", "0", pool=pool)
    assert bad.returncode == 2 and "--max-depth: must be a whole number of at least 1" in bad.stderr
    # the limit stored for the pool holds for submitters told nothing
    stored = tars(redis_server, "queue", "--set-max-depth", "2", pool=pool)
    assert stored.returncode == 0 and json.loads(stored.stdout)["max_depth"] == 2
    assert tars(redis_server, "submit", "--prompt", "x", pool=pool).returncode == 3
