"""The operator's PromQL, evaluated by Prometheus' own engine (promtool test rules) on made-up series."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tars_localcluster.config import cached_tool
from tars_operator import queries

LONG = "memory-" + "m" * 53  # 60 characters: the API server cuts generateName to 58


def series(pool: str, pod: str, memory: int | str) -> list[dict[str, str]]:
    """An agent's memory (a number, or promtool's notation of samples a minute apart) for 11 minutes."""
    labels = f'namespace="ns",pod="{pod}"'
    values = f"{memory}x10" if isinstance(memory, int) else memory
    return [
        {"series": f"process_resident_memory_bytes{{{labels}}}", "values": values},
        {"series": f'tars_queue_depth{{{labels},pool="{pool}",priority="normal"}}', "values": "0x10"},
    ]


def evaluate(
    expr: str, inputs: list[dict[str, str]], expected: list[dict[str, Any]], tmp: Path, at: str = "2m"
) -> None:
    promtool = cached_tool("promtool")
    if promtool is None:
        pytest.fail(
            "promtool not found: run `make cluster-build`, which builds it with Prometheus", pytrace=False
        )
    case = {
        "tests": [
            {
                "interval": "1m",
                "input_series": inputs,
                "promql_expr_test": [{"expr": expr, "eval_time": at, "exp_samples": expected}],
            }
        ]
    }
    path = tmp / "case.yaml"
    path.write_text(json.dumps(case))  # YAML is a superset of JSON
    proc = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("pool", "pod"),
    [("a.b", "a.b-abcde"), (LONG, LONG[:58] + "vwxyz")],
)
def test_the_memory_query_finds_exactly_the_pools_own_agents(pool: str, pod: str, tmp_path: Path) -> None:
    inputs = (
        series(pool, pod, 100) + series("axb", "axb-fghij", 999) + series(LONG[:-1], LONG[:58] + "zzzzz", 7)
    )
    evaluate(
        queries.agent_memory(pool, "ns"),
        inputs,
        [{"labels": f'process_resident_memory_bytes{{namespace="ns",pod="{pod}"}}', "value": 100}],
        tmp_path,
    )


def test_memory_usage_is_the_highest_agents_p95_and_the_peak_of_the_window(tmp_path: Path) -> None:
    """At 10m with a 5m window sampled every minute: the samples at 6..10m count, so neither the
    early 900s of agent a nor the other pool's 999s; a's p95 (Prometheus interpolates between
    100 and 200: 180) is above b's 50."""
    inputs = (
        series("p", "p-aaaaa", "900x5 100x3 200")
        + series("p", "p-bbbbb", 50)
        + series("other", "other-ccccc", 999)
    )
    usage = queries.agent_memory_usage("p", "ns", dt.timedelta(minutes=5), dt.timedelta(minutes=1))
    expected = {"p95": 180, "peak": 200, "samples": 10}
    evaluate(
        usage,
        inputs,
        [{"labels": f'{{{queries.MEMORY_STAT_LABEL}="{k}"}}', "value": v} for k, v in expected.items()],
        tmp_path,
        at="10m",
    )
