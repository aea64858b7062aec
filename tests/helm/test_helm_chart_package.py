"""The chart as a whole: lint, the CRD it ships, packaging, values.schema.json."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import yaml

from .conftest import CHART, REPO, VALUES_ALL, Render, by_kind, render_error, run_helm

REPO_CRD = REPO / "crds" / "agentpool.yaml"


@pytest.mark.parametrize("values", [None, VALUES_ALL], ids=["defaults", "everything-on"])
def test_lint_strict(helm: str, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART), "--kube-version", "1.37.0"]
    if values:
        args += ["-f", str(values)]
    proc = run_helm(helm, *args)
    assert "0 chart(s) failed" in proc.stdout


def test_template_renders_as_gitops_tools_run_it_without_a_kube_version(helm: str) -> None:
    """`helm template` with no cluster and no --kube-version assumes the Kubernetes version helm was
    built against (the official builds set it from client-go): the chart's kubeVersion must accept it."""
    proc = run_helm(helm, "template", "t", str(CHART), check=False)
    assert proc.returncode == 0, proc.stderr
    assert "kind: Deployment" in proc.stdout


def test_chart_crd_is_the_generated_crd() -> None:
    link = CHART / "crds" / "agentpool.yaml"
    assert link.is_symlink(), "the chart must link the generated CRD, not keep a copy"
    assert link.resolve() == REPO_CRD.resolve()
    assert not Path(link.readlink()).is_absolute(), "the link must be relative (the repo moves)"


def test_template_include_crds_renders_the_repo_crd(render: Render) -> None:
    crds = by_kind(render(include_crds=True), "CustomResourceDefinition")
    assert crds == [yaml.safe_load(REPO_CRD.read_text())]
    assert by_kind(render(), "CustomResourceDefinition") == []  # Helm installs crds/ itself


def test_package_carries_the_crd_content(helm: str, tmp_path: Path) -> None:
    run_helm(helm, "package", str(CHART), "--destination", str(tmp_path))
    archive = tmp_path / "tars-operator-0.1.0.tgz"
    with tarfile.open(archive) as tar:
        member = tar.getmember("tars-operator/crds/agentpool.yaml")
        assert member.isfile(), "helm package must store the CRD's content, not a link"
        packaged = tar.extractfile(member)
        assert packaged is not None
        assert packaged.read() == REPO_CRD.read_bytes()
        names = tar.getnames()
    assert "tars-operator/dashboards/tars.json" in names
    assert "tars-operator/values.schema.json" in names


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert (chart["name"], chart["version"], chart["appVersion"]) == ("tars-operator", "0.1.0", "0.1.0")
    assert chart["kubeVersion"] == ">=1.29.0-0"


def test_every_value_is_documented() -> None:
    """Every key in values.yaml has a comment line right above it (or is inside a documented map)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("-") or ":" not in stripped:
            continue
        if stripped.endswith(":") and i + 1 < len(lines):  # a section: its first child documents it
            continue
        above = lines[i - 1].strip() if i else ""
        parent_is_data = _inside_data_map(lines, i)
        if not above.startswith("#") and not parent_is_data:
            undocumented.append(f"{i + 1}: {stripped}")
    assert undocumented == []


def _inside_data_map(lines: list[str], i: int) -> bool:
    """True for keys of a documented free-form map (resources, securityContext, labels, ...)."""
    indent = len(lines[i]) - len(lines[i].lstrip())
    for j in range(i - 1, -1, -1):
        line = lines[j]
        if not line.strip() or line.strip().startswith("#"):
            continue
        if len(line) - len(line.lstrip()) < indent:
            parent_above = lines[j - 1].strip() if j else ""
            return parent_above.startswith("#") or _inside_data_map(lines, j)
    return False


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicas": -1}, "at '/replicas': minimum: got -1, want 0"),
        ({"prometheusUrl": 42}, "at '/prometheusUrl': got number, want string"),
        ({"prometheusUrl": "prometheus:9090"}, "at '/prometheusUrl'"),
        ({"redisUrl": "http://redis"}, "at '/redisUrl'"),
        ({"redisUrl": "redis://:pw@redis:6379/0"}, "at '/redisUrl'"),
        ({"networkPolicy": {"prometheusNamespaces": ["Mon"]}}, "at '/networkPolicy/prometheusNamespaces/0'"),
        ({"redis": {"tls": {"enable": True}}}, "at '/redis/tls': additional properties 'enable' not allowed"),
        ({"replicas": "two"}, "at '/replicas': got string, want integer"),
        ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'"),
        ({"watchNamespaces": "team-a"}, "at '/watchNamespaces': got string, want array"),
        ({"podAntiAffinity": "maybe"}, "at '/podAntiAffinity'"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'"),
        ({"metrics": {"port": 70000}}, "at '/metrics/port'"),
        ({"prometheusRule": {"thresholds": {"memory": 1.5}}}, "at '/prometheusRule/thresholds/memory'"),
        ({"prometheusRule": {"for": {"errors": "ten minutes"}}}, "at '/prometheusRule/for/errors'"),
        ({"replica": 3}, "additional properties 'replica' not allowed"),
        ({"redis": {"enable": True}}, "at '/redis': additional properties 'enable' not allowed"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_schema_refuses_bad_values(
    helm: str, tmp_path: Path, values: dict[str, object], message: str
) -> None:
    error = render_error(helm, tmp_path, values)
    assert "values don't meet the specifications of the schema" in error
    assert message in error


def test_leader_election_off_needs_one_replica(helm: str, tmp_path: Path) -> None:
    error = render_error(helm, tmp_path, {"leaderElection": {"enabled": False}, "replicas": 2})
    assert "leaderElection.enabled=false needs replicas <= 1" in error
