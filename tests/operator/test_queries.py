"""The operator's PromQL, evaluated by Prometheus' own engine (promtool test rules) on made-up series."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tars_localcluster.config import cached_tool
from tars_operator import queries

LONG = "memory-" + "m" * 53  # 60 characters: the API server cuts generateName to 58


def series(pool: str, pod: str, memory: int) -> list[dict[str, str]]:
    labels = f'namespace="ns",pod="{pod}"'
    return [
        {"series": f"process_resident_memory_bytes{{{labels}}}", "values": f"{memory}x5"},
        {"series": f'tars_queue_depth{{{labels},pool="{pool}",priority="normal"}}', "values": "0x5"},
    ]


def evaluate(expr: str, inputs: list[dict[str, str]], expected: list[dict[str, Any]], tmp: Path) -> None:
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
                "promql_expr_test": [{"expr": expr, "eval_time": "2m", "exp_samples": expected}],
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
