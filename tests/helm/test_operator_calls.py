"""The chart grants every API call the operator's code makes (derived from the code, not listed).

The e2e suite asks the real API server (`kubectl auth can-i`, e2e/test_helm_chart.py) with
the same derived list; this is the fast check on the rendered rules.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e.operator_calls import UnmappedCall, derived_calls, operator_calls

from .conftest import Obj, Render, one

FULLNAME = "t-tars-operator"


def test_the_derived_calls_include_the_resize_a_hand_kept_list_missed() -> None:
    calls = derived_calls()
    assert ("patch", "pods --subresource=resize", "W") in calls
    assert ("patch", "agentpools.tars.dev --subresource=status", "W") in calls
    assert ("update", "leases.coordination.k8s.io/tars-operator", "O") in calls


def test_a_call_of_a_kind_nobody_mapped_fails_loudly(tmp_path: Path) -> None:
    (tmp_path / "new.py").write_text(
        "async def f(api):\n    await api.delete_namespaced_config_map('x', 'ns')\n"
    )
    with pytest.raises(UnmappedCall, match="config_map"):
        derived_calls(tmp_path)


def granted(rules: list[Obj], verb: str, spec: str) -> bool:
    """RBAC's rule match for one `kubectl auth can-i` spec: "resource.group[/name] [--subresource=s]"."""
    target, _, sub = spec.partition(" --subresource=")
    target, _, name = target.partition("/")
    resource, _, group = target.partition(".")
    wanted = f"{resource}/{sub}" if sub else resource
    return any(
        verb in rule.get("verbs", [])
        and group in rule.get("apiGroups", [])
        and wanted in rule.get("resources", [])
        and (not rule.get("resourceNames") or name in rule["resourceNames"])
        for rule in rules
    )


def test_the_chart_grants_every_call_the_operator_makes(render: Render) -> None:
    objs = render()
    scopes = {
        "W": one(objs, "ClusterRole", FULLNAME)["rules"],
        "O": one(objs, "Role", f"{FULLNAME}-leader-election")["rules"],
        "": one(objs, "ClusterRole", f"{FULLNAME}-observer")["rules"],
    }
    missing = [
        (verb, spec, where)
        for verb, spec, where in operator_calls()
        if not granted(scopes[where], verb, spec)
    ]
    assert missing == []
