"""The operator carries the contract, not the agent: its image has no agent runtime in it."""

from __future__ import annotations

import ast
from pathlib import Path

OPERATOR = Path(__file__).resolve().parents[2] / "operator"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_operator_imports_nothing_of_the_agent_runtime() -> None:
    offenders = {
        str(path.relative_to(OPERATOR)): sorted(
            m for m in imported_modules(path) if m.split(".")[0] == "tars_agent"
        )
        for path in (OPERATOR / "tars_operator").rglob("*.py")
    }
    assert {f: m for f, m in offenders.items() if m} == {}
    dockerfile = (OPERATOR / "Dockerfile").read_text()
    assert "agent_image" not in dockerfile and "contract/tars_contract" in dockerfile
