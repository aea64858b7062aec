"""The API calls the operator makes, derived from its code, for the RBAC tests.

A hand-kept list once missed the in-place resize call (403 as shipped). Here every
KubeApi call (operator/tars_operator/kubeclient.py) of the form
`<verb>_namespaced_<kind>[_<subresource>]` in the operator's package is found by reading its
syntax tree (an "apply", a server-side apply, needs patch and create), and mapped to what
`kubectl auth can-i` asks; a
call whose kind is not mapped fails the fast test (tests/helm/test_operator_calls.py), so
a new call cannot slip past the RBAC tests.
kopf's own calls (its watches, a finalizer patch, CRD discovery) are not in our code:
they are listed below, from its documentation and the 1.45 source.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

OPERATOR_PACKAGE = Path(__file__).resolve().parents[1] / "operator" / "tars_operator"

# `kubectl auth can-i` resource for each kind the operator calls, by the client's method name.
KINDS = {
    "pod": "pods",
    "event": "events",
    "lease": "leases.coordination.k8s.io",
    "agent_pool": "agentpools.tars.dev",
    "secret": "secrets",
    "network_policy": "networkpolicies.networking.k8s.io",
}
VERBS = {
    "create": ("create",),
    "read": ("get",),
    "replace": ("update",),
    "patch": ("patch",),
    "delete": ("delete",),
    # A server-side apply that creates the object is authorized as create.
    "apply": ("patch", "create"),
}
SUBRESOURCES = ("status", "resize")
# The Lease is granted by name (the chart's resourceNames); creating it cannot be.
LEASE_NAME = "tars-operator"
# Calls made in the operator's own namespace ("O"); all others in the watched ones ("W").
OWN_NAMESPACE_FILES = {"leader.py"}

_CALL = re.compile(r"^(create|read|replace|patch|delete|apply)_namespaced_([a-z_]+)$")

KOPF_CALLS = [
    ("list", "pods", "W"),
    ("watch", "pods", "W"),
    ("list", "agentpools.tars.dev", "W"),
    ("watch", "agentpools.tars.dev", "W"),
    ("patch", "agentpools.tars.dev", "W"),  # removing a finalizer an earlier version left
    ("list", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io", ""),
]


class UnmappedCall(ValueError):
    pass


def _can_i(call: str, verb: str, kind: str) -> str:
    subresource = next((s for s in SUBRESOURCES if kind.endswith(f"_{s}")), None)
    base = kind.removesuffix(f"_{subresource}") if subresource else kind
    if base not in KINDS:
        raise UnmappedCall(f"{call}_namespaced_{kind}: add {base!r} to e2e/operator_calls.py KINDS")
    resource = KINDS[base]
    if base == "lease" and verb != "create":
        resource = f"{resource}/{LEASE_NAME}"
    return f"{resource} --subresource={subresource}" if subresource else resource


def derived_calls(package: Path = OPERATOR_PACKAGE) -> list[tuple[str, str, str]]:
    """(verb, can-i resource, "W" or "O") for each namespaced API call in the operator's code."""
    calls: set[tuple[str, str, str]] = set()
    for path in sorted(package.rglob("*.py")):
        where = "O" if path.name in OWN_NAMESPACE_FILES else "W"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                match = _CALL.match(node.func.attr)
                if match:
                    call, kind = match.groups()
                    for verb in VERBS[call]:
                        calls.add((verb, _can_i(call, verb, kind), where))
    return sorted(calls)


# Not a call, but what the API server checks for one: agents carry an owner reference with
# blockOwnerDeletion, which the OwnerReferencesPermissionEnforcement admission plugin allows
# only to who may update the owner's finalizers.
IMPLIED_CALLS = [("update", "agentpools.tars.dev --subresource=finalizers", "W")]


def operator_calls() -> list[tuple[str, str, str]]:
    return derived_calls() + KOPF_CALLS + IMPLIED_CALLS
