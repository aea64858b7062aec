"""The AgentPool API on the real API server: schema, defaults, CEL rules,
subresources, printer columns (issue 3, "API")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from e2e.harness import Kube

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml") if "kind: AgentPool" in p.read_text())


@pytest.fixture(scope="session")
def agentpool_crd(kube: Kube) -> None:
    kube.run("apply", "-f", str(REPO / "crds"))
    kube.run("wait", "--for=condition=Established", "crd/agentpools.tars.dev", "--timeout=30s")


def minimal(name: str, **spec: object) -> dict[str, object]:
    return {
        "apiVersion": "tars.dev/v1alpha1",
        "kind": "AgentPool",
        "metadata": {"name": name},
        "spec": {"template": {"spec": {"containers": [{"name": "agent", "image": "tars-agent"}]}}, **spec},
    }


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_applies(kube: Kube, namespace: str, agentpool_crd: None, example: Path) -> None:
    kube.run("apply", "-n", namespace, "-f", str(example))
    name = yaml.safe_load(example.read_text())["metadata"]["name"]
    assert kube.get("agentpool", name, namespace)["spec"]["template"]["spec"]["containers"]


def test_server_fills_in_every_default(kube: Kube, namespace: str, agentpool_crd: None) -> None:
    kube.apply(minimal("defaults"), namespace=namespace)
    spec = kube.get("ap", "defaults", namespace)["spec"]
    assert spec["replicas"] == {"min": 1, "max": 10}
    assert spec["warm"] == {"min": 3}
    assert spec["scaling"]["queueDepth"]["threshold"] == 50
    assert spec["rotation"]["ttl"] == "30m"
    assert spec["queue"]["maxDepth"] == 500


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"replicas": {"min": 5, "max": 2}},
            "spec.replicas.min: Invalid value: replicas.min must not exceed replicas.max",
        ),
        ({"warm": {"min": 50}}, "spec.warm.min: Invalid value: warm.min must not exceed replicas.max"),
        (
            {"memory": {"min": "2Gi", "max": "1Gi"}},
            "spec.memory.min: Invalid value: memory.min must not exceed memory.max",
        ),
        ({"replicas": {"min": -1}}, "spec.replicas.min in body should be greater than or equal to 0"),
        ({"scaling": {"interval": "ten seconds"}}, "spec.scaling.interval in body should match"),
        ({"memory": {"mode": "Sometimes"}}, 'spec.memory.mode: Unsupported value: "Sometimes"'),
        ({"queue": {"maxDepth": "many"}}, "spec.queue.maxDepth: Invalid value"),
        # Credentials only by Secret reference (the CEL rule on spec.redis reports on its url).
        ({"redis": {"url": "redis://:s3cret@redis:6379/0"}}, "spec.redis.url: Invalid value"),
        ({"redis": {"url": "redis://:s3cret@redis:6379/0"}}, "redis.passwordSecretRef"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(
    kube: Kube, namespace: str, agentpool_crd: None, spec: dict[str, object], message: str
) -> None:
    refused = kube.run(
        "apply", "-n", namespace, "-f", "-", stdin=json.dumps(minimal("bad", **spec)), check=False
    )
    assert refused.returncode != 0
    assert message in refused.stderr, refused.stderr
    assert not kube.exists("agentpool", "bad", namespace)


def test_a_template_without_containers_is_refused(kube: Kube, namespace: str, agentpool_crd: None) -> None:
    body = minimal("empty")
    body["spec"] = {"template": {"spec": {"containers": []}}}
    refused = kube.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(body), check=False)
    assert refused.returncode != 0 and "spec.template.spec.containers" in refused.stderr, refused.stderr


def test_scale_subresource_drives_the_floor(kube: Kube, namespace: str, agentpool_crd: None) -> None:
    kube.apply(minimal("scaled"), namespace=namespace)
    kube.run("scale", "ap", "scaled", "-n", namespace, "--replicas=4")
    assert kube.get("ap", "scaled", namespace)["spec"]["replicas"]["min"] == 4
    scale = json.loads(
        kube.run(
            "get", "--raw", f"/apis/tars.dev/v1alpha1/namespaces/{namespace}/agentpools/scaled/scale"
        ).stdout
    )
    assert scale["spec"]["replicas"] == 4


def test_status_is_a_subresource_and_printer_columns_show_it(
    kube: Kube, namespace: str, agentpool_crd: None
) -> None:
    kube.apply(minimal("columns"), namespace=namespace)
    # A write of .status through the main resource is ignored; the status subresource takes it.
    kube.run("patch", "ap", "columns", "-n", namespace, "--type=merge", "-p", '{"status": {"busy": 9}}')
    assert "busy" not in kube.get("ap", "columns", namespace).get("status", {})
    kube.run(
        "patch",
        "ap",
        "columns",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status": {"desiredReplicas": 6, "ready": 4, "warm": 3, "busy": 1, "queueDepth": 75}}',
    )
    table = kube.run("get", "ap", "columns", "-n", namespace).stdout.split()
    assert table[:7] == ["NAME", "DESIRED", "READY", "WARM", "BUSY", "QUEUE", "AGE"]
    assert table[7:13] == ["columns", "6", "4", "3", "1", "75"]
